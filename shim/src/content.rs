//! Wasm OCI artifacts: a container's module read out of containerd's
//! content store, for images whose layer is the module itself
//! (`application/vnd.wasm.content.layer.v1+wasm`) rather than a tar that
//! containerd unpacks into the rootfs.
//!
//! containerd serves its store over gRPC only; the three unary/streaming
//! calls needed (`Containers/Get`, `Images/Get`, `Content/Read`) are made
//! here over HTTP/2 on its Unix socket, with the few protobuf fields they
//! use encoded by hand: no generated client, no protoc.

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::{Buf as _, Bytes};
use sha2::{Digest as _, Sha256};

/// Layer media types that are a Wasm module or component.
pub use corral_compiler::image::WASM_LAYER_TYPES;
use corral_compiler::image::{self, Descriptor, ImageError, Parsed};

/// The largest module read (a guard against a bad descriptor).
const MAX_BLOB: u64 = 512 * 1024 * 1024;

/// The module of container `id`'s image, if that image has a Wasm layer.
pub fn wasm_layer_of_container(
    address: &str,
    namespace: &str,
    id: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    block_on(async {
        let mut c = Client::connect(address, namespace).await?;
        let resp = c
            .unary(
                "/containerd.services.containers.v1.Containers/Get",
                string_field(1, id),
            )
            .await?;
        let container = field(&resp, 1).context("GetContainerResponse without container")?;
        let image = field(container, 3).unwrap_or_default();
        if image.is_empty() {
            return Ok(None);
        }
        let image = String::from_utf8_lossy(image).into_owned();
        c.wasm_layer(&image).await
    })
}

/// The module of image `name`, if it has a Wasm layer.
pub fn wasm_layer_of_image(
    address: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    block_on(async {
        let mut c = Client::connect(address, namespace).await?;
        c.wasm_layer(name).await
    })
}

fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

struct Client {
    send: h2::client::SendRequest<Bytes>,
    namespace: String,
}

impl Client {
    async fn connect(address: &str, namespace: &str) -> anyhow::Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let io = tokio::net::UnixStream::connect(Path::new(path))
            .await
            .with_context(|| format!("connecting to containerd at {path}"))?;
        let (send, conn) = h2::client::handshake(io)
            .await
            .context("HTTP/2 handshake with containerd")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            send,
            namespace: namespace.to_string(),
        })
    }

    /// The first Wasm layer of image `name` (of its manifest, or of the
    /// index's manifest for wasm or for this host).
    async fn wasm_layer(&mut self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let resp = self
            .unary(
                "/containerd.services.images.v1.Images/Get",
                string_field(1, name),
            )
            .await?;
        let image = field(&resp, 1).context("GetImageResponse without image")?;
        let target = field(image, 3).context("image without target")?;
        let mut desc = Descriptor {
            media_type: text(field(target, 1)),
            digest: text(field(target, 2)),
            size: varint_field(target, 3).unwrap_or(0),
            platform: None,
        };
        for _ in 0..2 {
            let blob = self.read(&desc).await?;
            // The media-type rules are corral_compiler::image's, shared with
            // `corral pull` and corrald's registry fetches.
            match image::parse(&desc.media_type, &blob) {
                Ok(Parsed::Index(entry)) => desc = entry,
                Ok(Parsed::Module(layer)) => return Ok(Some(self.read(&layer).await?)),
                // Not a Wasm image: the shim runs its rootfs instead.
                Err(ImageError::NoWasmLayer { .. } | ImageError::NoWasmPlatform(_)) => {
                    return Ok(None);
                }
                Err(e) => bail!("{name}: {} ({}): {e}", desc.digest, desc.media_type),
            }
        }
        bail!("{name}: an index of indexes");
    }

    /// A blob of the content store, checked against its digest.
    async fn read(&mut self, desc: &Descriptor) -> anyhow::Result<Vec<u8>> {
        if desc.size > MAX_BLOB {
            bail!("{}: {} bytes is too large", desc.digest, desc.size);
        }
        let messages = self
            .call(
                "/containerd.services.content.v1.Content/Read",
                string_field(1, &desc.digest),
            )
            .await?;
        let mut data = Vec::with_capacity(desc.size as usize);
        for m in &messages {
            data.extend_from_slice(field(m, 2).unwrap_or_default());
        }
        let want = desc.digest.strip_prefix("sha256:").unwrap_or_default();
        if hex::encode(Sha256::digest(&data)) != want {
            bail!("{}: the content store's bytes do not match", desc.digest);
        }
        Ok(data)
    }

    async fn unary(&mut self, path: &str, msg: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let mut messages = self.call(path, msg).await?;
        if messages.len() != 1 {
            bail!("{path}: {} messages in a unary answer", messages.len());
        }
        Ok(messages.remove(0))
    }

    /// One gRPC call: one request message, all the answer's messages.
    async fn call(&mut self, path: &str, msg: Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>> {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://containerd{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("containerd-namespace", &self.namespace)
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(req, false)?;
        let mut frame = Vec::with_capacity(msg.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        stream.send_data(Bytes::from(frame), true)?;
        let response = response.await.with_context(|| format!("calling {path}"))?;
        let (head, mut body) = response.into_parts();
        grpc_status(path, &head.headers)?;
        let mut buf = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        if let Some(trailers) = body.trailers().await? {
            grpc_status(path, &trailers)?;
        }
        let mut messages = Vec::new();
        let mut rest = Bytes::from(buf);
        while rest.remaining() >= 5 {
            let _compressed = rest.get_u8();
            let len = rest.get_u32() as usize;
            if rest.remaining() < len {
                bail!("{path}: a truncated message");
            }
            messages.push(rest.split_to(len).to_vec());
        }
        Ok(messages)
    }
}

fn grpc_status(path: &str, headers: &http::HeaderMap) -> anyhow::Result<()> {
    match headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("0") => Ok(()),
        Some(code) => {
            let msg = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            bail!("{path}: containerd answered gRPC status {code}: {msg}")
        }
    }
}

/// The manifest of an index for Wasm (`os` wasi/wasip1/wasip2 or
/// `architecture` wasm), else for this host, else the first.
fn text(b: Option<&[u8]>) -> String {
    String::from_utf8_lossy(b.unwrap_or_default()).into_owned()
}

// --- the few protobuf wire-format pieces the calls need -------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A message with one string field.
fn string_field(number: u64, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, (number << 3) | 2);
    put_varint(&mut out, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
    out
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// The fields of a message, in order (fixed-width ones skipped).
fn fields(buf: &[u8]) -> impl Iterator<Item = (u64, Value<'_>)> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        loop {
            let key = get_varint(buf, &mut pos)?;
            let (number, wire) = (key >> 3, key & 7);
            match wire {
                0 => return Some((number, Value::Varint(get_varint(buf, &mut pos)?))),
                2 => {
                    let len = get_varint(buf, &mut pos)? as usize;
                    let bytes = buf.get(pos..pos.checked_add(len)?)?;
                    pos += len;
                    return Some((number, Value::Bytes(bytes)));
                }
                1 => pos += 8,
                5 => pos += 4,
                _ => return None,
            }
        }
    })
}

/// The last length-delimited field `number` (a string, bytes or message).
fn field(buf: &[u8], number: u64) -> Option<&[u8]> {
    fields(buf)
        .filter_map(|(n, v)| match v {
            Value::Bytes(b) if n == number => Some(b),
            _ => None,
        })
        .last()
}

fn varint_field(buf: &[u8], number: u64) -> Option<u64> {
    fields(buf)
        .filter_map(|(n, v)| match v {
            Value::Varint(x) if n == number => Some(x),
            _ => None,
        })
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trip() {
        let mut desc = string_field(1, "application/vnd.oci.image.manifest.v1+json");
        desc.extend(string_field(2, "sha256:ab"));
        put_varint(&mut desc, 3 << 3);
        put_varint(&mut desc, 300);
        let mut image = string_field(1, "corral.test/x:1");
        put_varint(&mut image, (3 << 3) | 2);
        put_varint(&mut image, desc.len() as u64);
        image.extend_from_slice(&desc);
        let target = field(&image, 3).unwrap();
        assert_eq!(text(field(target, 2)), "sha256:ab");
        assert_eq!(varint_field(target, 3), Some(300));
        assert_eq!(text(field(&image, 1)), "corral.test/x:1");
        assert!(field(&image, 9).is_none());
        // Truncated input ends the iteration instead of panicking.
        assert!(field(&image[..image.len() - 3], 3).is_none());
    }
}
