//! OCI image layouts generated in-process: real ustar layers of seeded pseudo-random bytes
//! ([`SplitMix64`]), streamed to disk and hashed while written, so sizes of hundreds of MiB
//! are fine. Every output is a pure function of the sizes and the seed.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{digest_hex, CHUNK, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, REF_NAME_ANNOTATION};

/// `SplitMix64`: a tiny seedable PRNG; its output is incompressible enough for test layers.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Derives an independent seed for sub-object `n` of something seeded with `seed`.
fn derive_seed(seed: u64, n: u64) -> u64 {
    SplitMix64::new(seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// An image written by [`build_image`] (all blobs live in the layout's `blobs/sha256/`).
#[derive(Clone)]
pub struct Image {
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    /// `(digest, size in bytes)` of each layer blob, bottom first.
    pub layers: Vec<(String, u64)>,
    /// `(os, architecture)`.
    pub platform: (String, String),
}

impl Image {
    /// Config digest followed by the layer digests: every blob a pull must fetch.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(self.config_digest.clone()).chain(self.layers.iter().map(|(d, _)| d.clone())).collect()
    }

    /// OCI descriptor of the manifest (as used in an index or `index.json`).
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_bytes.len(),
        })
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("manifest_digest", &self.manifest_digest)
            .field("manifest", &String::from_utf8_lossy(&self.manifest_bytes))
            .field("config_digest", &self.config_digest)
            .field("config", &String::from_utf8_lossy(&self.config_bytes))
            .field("layers", &self.layers)
            .field("platform", &self.platform)
            .finish()
    }
}

/// A multi-platform index written by [`build_index`].
#[derive(Clone)]
pub struct Index {
    pub index_digest: String,
    pub index_bytes: Vec<u8>,
    /// One image per requested platform, in the same order.
    pub images: Vec<Image>,
}

impl Index {
    /// Every blob digest of every platform image (config and layers).
    pub fn blob_digests(&self) -> Vec<String> {
        self.images.iter().flat_map(Image::blob_digests).collect()
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("index_digest", &self.index_digest)
            .field("index", &String::from_utf8_lossy(&self.index_bytes))
            .field("images", &self.images)
            .finish()
    }
}

/// Path of blob `digest` inside OCI layout `layout`.
pub fn blob_path(layout: impl AsRef<Path>, digest: &str) -> PathBuf {
    layout.as_ref().join("blobs/sha256").join(digest_hex(digest))
}

/// Builds a single-arch linux/amd64 image in OCI layout `layout` (created if needed) and tags
/// it `tag` in the layout's `index.json` (other tags are kept; the same tag is replaced).
///
/// Each layer is an uncompressed tar holding one regular file of `layer_sizes[i]` random bytes,
/// so each layer blob is that size rounded up to 512 plus 1536 bytes (header and two zero
/// blocks); the actual blob sizes are in [`Image::layers`]. The output is a pure function of
/// `(layer_sizes, seed)`. Content is streamed and hashed while written: sizes of hundreds of
/// MiB are fine.
pub fn build_image(layout: impl AsRef<Path>, tag: &str, layer_sizes: &[u64], seed: u64) -> Image {
    let layout = layout.as_ref();
    let layers = write_layers(layout, layer_sizes, seed);
    let image = write_image(layout, &layers, ("linux", "amd64"), seed);
    tag_in_layout(layout, tag, image.descriptor());
    image
}

/// Like [`build_image`] but from layers already written with [`write_layer`], so that
/// several images can share layers.
pub fn build_image_with_layers(layout: impl AsRef<Path>, tag: &str, layers: &[(String, u64)], seed: u64) -> Image {
    let layout = layout.as_ref();
    let image = write_image(layout, layers, ("linux", "amd64"), seed);
    tag_in_layout(layout, tag, image.descriptor());
    image
}

/// Builds an OCI index over one image per `(os, architecture)` in `platforms`, each with two
/// small layers (1 KiB and 16 KiB of content), and tags the index `tag`.
pub fn build_index(layout: impl AsRef<Path>, tag: &str, platforms: &[(&str, &str)], seed: u64) -> Index {
    build_index_sized(layout, tag, platforms, &[1024, 16 * 1024], seed)
}

/// [`build_index`] with explicit layer content sizes for every platform image. Platform
/// images get distinct seeds, so they share no blobs.
pub fn build_index_sized(
    layout: impl AsRef<Path>,
    tag: &str,
    platforms: &[(&str, &str)],
    layer_sizes: &[u64],
    seed: u64,
) -> Index {
    let layout = layout.as_ref();
    let images: Vec<Image> = platforms
        .iter()
        .zip(1..)
        .map(|(&platform, n)| {
            let image_seed = derive_seed(seed, n);
            let layers = write_layers(layout, layer_sizes, image_seed);
            write_image(layout, &layers, platform, image_seed)
        })
        .collect();
    let manifests: Vec<Value> = images
        .iter()
        .map(|img| {
            let mut d = img.descriptor();
            d["platform"] = json!({"os": img.platform.0, "architecture": img.platform.1});
            d
        })
        .collect();
    let index_bytes = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }));
    let (index_digest, _) = write_blob(layout, &index_bytes);
    tag_in_layout(layout, tag, json!({"mediaType": OCI_INDEX, "digest": index_digest, "size": index_bytes.len()}));
    Index { index_digest, index_bytes, images }
}

/// Writes one layer blob (a tar with one file of `content_size` random bytes derived from
/// `seed`) into `layout` and returns its `(digest, blob size)`.
pub fn write_layer(layout: impl AsRef<Path>, content_size: u64, seed: u64) -> (String, u64) {
    let layout = layout.as_ref();
    let mut blob = BlobWriter::new(layout);
    let name = format!("ferry-e2e/{seed:016x}.bin");
    blob.write(&ustar_header(&name, content_size));
    let mut rng = SplitMix64::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut remaining = content_size;
    while remaining > 0 {
        let n = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
        rng.fill(&mut buf[..n]);
        blob.write(&buf[..n]);
        remaining -= n as u64;
    }
    let padding = (512 - (content_size % 512) as usize) % 512;
    blob.write(&vec![0u8; padding + 1024]);
    blob.finish()
}

fn write_layers(layout: &Path, layer_sizes: &[u64], seed: u64) -> Vec<(String, u64)> {
    layer_sizes.iter().zip(1..).map(|(&size, n)| write_layer(layout, size, derive_seed(seed, n))).collect()
}

/// Writes config and manifest blobs for `layers` (the layout marker too) and returns the image.
fn write_image(layout: &Path, layers: &[(String, u64)], (os, arch): (&str, &str), seed: u64) -> Image {
    let diff_ids: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let history: Vec<Value> =
        layers.iter().map(|_| json!({"created": "2024-01-01T00:00:00Z", "created_by": "ferry-e2e harness"})).collect();
    let config_bytes = to_json(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.example.ferry-e2e.seed": seed.to_string()},
        },
        // Layers are uncompressed, so each diff_id equals the layer digest.
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }));
    let (config_digest, config_size) = write_blob(layout, &config_bytes);
    let layer_descriptors: Vec<Value> =
        layers.iter().map(|(d, s)| json!({"mediaType": OCI_LAYER_TAR, "digest": d, "size": s})).collect();
    let manifest_bytes = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descriptors,
    }));
    let (manifest_digest, _) = write_blob(layout, &manifest_bytes);
    Image {
        manifest_digest,
        manifest_bytes,
        config_digest,
        config_bytes,
        layers: layers.to_vec(),
        platform: (os.to_string(), arch.to_string()),
    }
}

/// Points `tag` at `descriptor` in `layout/index.json`, replacing any entry with that tag.
fn tag_in_layout(layout: &Path, tag: &str, mut descriptor: Value) {
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write oci-layout");
    let index_path = layout.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(bytes) => {
            let index: Value = serde_json::from_slice(&bytes).expect("parse layout index.json");
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", index_path.display()),
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != tag);
    descriptor["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    manifests.push(descriptor);
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    fs::write(&index_path, to_json(&index)).expect("write layout index.json");
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialize JSON")
}

/// Writes `bytes` as a blob in `layout`; returns `(digest, size)`.
fn write_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let mut blob = BlobWriter::new(layout);
    blob.write(bytes);
    blob.finish()
}

/// Streams a blob into a temporary file next to its final place, hashing as it goes.
struct BlobWriter {
    file: BufWriter<File>,
    tmp_path: PathBuf,
    blobs_dir: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    fn new(layout: &Path) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let blobs_dir = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs_dir).unwrap_or_else(|e| panic!("create {}: {e}", blobs_dir.display()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = blobs_dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let file = File::create(&tmp_path).unwrap_or_else(|e| panic!("create {}: {e}", tmp_path.display()));
        Self { file: BufWriter::with_capacity(CHUNK, file), tmp_path, blobs_dir, hasher: Sha256::new(), size: 0 }
    }

    fn write(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.write_all(data).unwrap_or_else(|e| panic!("write {}: {e}", self.tmp_path.display()));
    }

    fn finish(self) -> (String, u64) {
        let file = self.file.into_inner().expect("flush blob");
        drop(file);
        let hex = hex::encode(self.hasher.finalize());
        let dest = self.blobs_dir.join(&hex);
        fs::rename(&self.tmp_path, &dest).unwrap_or_else(|e| panic!("rename blob to {}: {e}", dest.display()));
        (format!("sha256:{hex}"), self.size)
    }
}

/// A POSIX ustar header for a regular file `name` (< 100 bytes) of `size` bytes.
fn ustar_header(name: &str, size: u64) -> [u8; 512] {
    const MTIME: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z, like the image config
    assert!(name.len() < 100, "tar member name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644); // mode
    put_octal(&mut h[108..116], 0); // uid
    put_octal(&mut h[116..124], 0); // gid
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], MTIME);
    h[148..156].fill(b' '); // checksum is computed with this field as spaces
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Zero-padded octal digits filling all but the last byte of `field`, then NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    assert_eq!(text.len(), digits, "{value} does not fit a {digits}-digit tar field");
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}
