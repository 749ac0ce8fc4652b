//! Message bodies through the proxy: framing (length, chunked, until EOF), streamed in
//! pieces, with the body faults (cut short, one flipped bit) applied on the way.

use std::io::{self, BufRead, Read, Write};
use std::time::Instant;

use super::serve::Head;
use super::{invalid, Shared, COPY_CHUNK, MAX_CHUNK_LINE, MAX_HEAD_LINES};

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    /// Chunked in, chunked out (re-chunked along the pieces read; trailers dropped).
    Chunked,
    UntilEof,
}

pub(super) fn request_framing(head: &Head) -> io::Result<Framing> {
    Ok(if head.is_chunked() { Framing::Chunked } else { head.content_length()?.map_or(Framing::None, Framing::Length) })
}

pub(super) fn response_framing(is_head: bool, status: u16, head: &Head) -> io::Result<Framing> {
    Ok(if is_head || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::None
    } else if head.is_chunked() {
        Framing::Chunked
    } else {
        head.content_length()?.map_or(Framing::UntilEof, Framing::Length)
    })
}

/// Body misbehaviour, in payload offsets (after de-chunking).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BodyFault {
    /// Stop forwarding after this many bytes.
    pub(super) cut_after: Option<u64>,
    /// Flip the lowest bit of the byte at this offset.
    pub(super) corrupt_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyEnd {
    Complete,
    /// Stopped at `BodyFault::cut_after` with more body still to come.
    Cut,
}

/// Writes payload pieces to `out`, applying a [`BodyFault`] and chunked framing.
struct Pump<'a, W: Write> {
    shared: &'a Shared,
    out: &'a mut W,
    chunked: bool,
    sent: u64,
    fault: BodyFault,
    deadline: Instant,
}

impl<W: Write> Pump<'_, W> {
    /// Forwards one piece; `Ok(false)` once the body has been cut.
    fn forward(&mut self, data: &mut [u8]) -> io::Result<bool> {
        if self.shared.stopping() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "fault proxy is stopping"));
        }
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "fault proxy connection deadline"));
        }
        let len = data.len() as u64;
        if let Some(at) = self.fault.corrupt_at {
            if (self.sent..self.sent + len).contains(&at) {
                data[usize::try_from(at - self.sent).expect("offset within piece")] ^= 0x01;
            }
        }
        let keep = match self.fault.cut_after {
            Some(cut) if self.sent + len > cut => usize::try_from(cut.saturating_sub(self.sent)).expect("within piece"),
            _ => data.len(),
        };
        if self.chunked {
            write!(self.out, "{:x}\r\n", data.len())?;
        }
        self.out.write_all(&data[..keep])?;
        self.sent += keep as u64;
        if keep < data.len() {
            return Ok(false);
        }
        if self.chunked {
            self.out.write_all(b"\r\n")?;
        }
        Ok(true)
    }

    /// Forwards exactly `n` bytes from `src`.
    fn forward_exact(&mut self, src: &mut impl Read, n: u64, buf: &mut [u8]) -> io::Result<bool> {
        let mut remaining = n;
        while remaining > 0 {
            let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
            let got = src.read(&mut buf[..want])?;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body shorter than announced"));
            }
            remaining -= got as u64;
            if !self.forward(&mut buf[..got])? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reads one CRLF-terminated line of a chunked body.
fn read_chunk_line(src: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    src.by_ref().take(MAX_CHUNK_LINE).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(invalid("chunked body: line too long or cut short".to_string()));
    }
    Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string())
}

/// Streams a body with `framing` from `src` to `out`, applying `fault`.
pub(super) fn copy_body(
    shared: &Shared,
    src: &mut impl BufRead,
    out: &mut impl Write,
    framing: Framing,
    fault: BodyFault,
    deadline: Instant,
) -> io::Result<CopyEnd> {
    let mut pump = Pump { shared, out, chunked: framing == Framing::Chunked, sent: 0, fault, deadline };
    let mut buf = vec![0u8; COPY_CHUNK];
    let cut = |more: bool| if more { CopyEnd::Complete } else { CopyEnd::Cut };
    match framing {
        Framing::None => Ok(CopyEnd::Complete),
        Framing::Length(n) => pump.forward_exact(src, n, &mut buf).map(cut),
        Framing::UntilEof => {
            // Bounded by the connection deadline (checked in `forward`) and the socket timeouts.
            loop {
                let got = src.read(&mut buf)?;
                if got == 0 {
                    return Ok(CopyEnd::Complete);
                }
                if !pump.forward(&mut buf[..got])? {
                    return Ok(CopyEnd::Cut);
                }
            }
        }
        Framing::Chunked => {
            // One pass per chunk, bounded by the deadline (each pass reads at least a line).
            while Instant::now() < deadline {
                let line = read_chunk_line(src)?;
                let size_hex = line.split(';').next().unwrap_or_default().trim();
                let size =
                    u64::from_str_radix(size_hex, 16).map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Skip trailers up to the blank line, then end our own chunked body.
                    for _ in 0..MAX_HEAD_LINES {
                        if read_chunk_line(src)?.is_empty() {
                            pump.out.write_all(b"0\r\n\r\n")?;
                            return Ok(CopyEnd::Complete);
                        }
                    }
                    return Err(invalid("too many trailer lines".to_string()));
                }
                if !pump.forward_exact(src, size, &mut buf)? {
                    return Ok(CopyEnd::Cut);
                }
                if !read_chunk_line(src)?.is_empty() {
                    return Err(invalid("chunk not followed by CRLF".to_string()));
                }
            }
            Err(io::Error::new(io::ErrorKind::TimedOut, "fault proxy connection deadline"))
        }
    }
}
