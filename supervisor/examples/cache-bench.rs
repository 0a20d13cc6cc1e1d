//! A benchmark fixture, not part of corral: scenario 4 of `tests/bench/run`.
//! Times `Cache::load_or_compile`, the call corrald makes for each app, into
//! an empty cache (a compile) and on a hit, in this process (no process
//! start in the figures), for a small module given on the command line and
//! a large generated one: 20,000 small exported functions and 7 MB of data
//! (8.7 MB; the shape of `compiler/benches/cache.rs`). Prints JSON.
//!
//! ```sh
//! cargo build --release -p corral-supervisor --example cache-bench
//! target/release/examples/cache-bench --small tests/guests/stdio-echo.wasm --compiles 3
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::{Cache, EngineOptions};

const HITS: usize = 21;

fn main() -> anyhow::Result<()> {
    let mut small = None;
    let mut compiles = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--small" => small = args.next(),
            "--compiles" => compiles = args.next().context("--compiles N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let small = small.context("--small FILE")?;
    let tmp = tempfile::tempdir()?;
    let large = tmp.path().join("large.wasm");
    std::fs::write(&large, big_module(20_000, 7 << 20))?;
    // The cache records a source's digest only for files older than 2 s
    // (docs/cache.md); a deployed module is older than that.
    std::thread::sleep(Duration::from_millis(2100));

    let engine = corral_compiler::build_engine(&EngineOptions::default_for_cli(), None)?.engine;
    let mut out = Vec::new();
    for (name, path, n) in [
        ("small", Path::new(&small), compiles.max(5)),
        ("large", large.as_path(), compiles),
    ] {
        let mut compile = Vec::new();
        let mut hit = Vec::new();
        let mut artifact_bytes = 0;
        for i in 0..n {
            let dir = tmp.path().join(format!("cache-{name}-{i}"));
            let cache = Cache::open(&dir)?;
            let t = Instant::now();
            let a = cache.load_or_compile(&engine, path)?;
            compile.push(t.elapsed());
            anyhow::ensure!(!a.cache_hit, "expected a compile");
            artifact_bytes = a.meta.artifact_size;
            drop(a);
            if i == 0 {
                for _ in 0..HITS {
                    let t = Instant::now();
                    let a = cache.load_or_compile(&engine, path)?;
                    hit.push(t.elapsed());
                    anyhow::ensure!(a.cache_hit, "expected a hit");
                }
            }
            std::fs::remove_dir_all(&dir)?;
        }
        out.push(serde_json::json!({
            "name": path.file_name().map(|f| f.to_string_lossy().into_owned())
                .filter(|_| name == "small").unwrap_or_else(|| "generated large module".into()),
            "module_bytes": std::fs::metadata(path)?.len(),
            "artifact_bytes": artifact_bytes,
            "compiles": n,
            "compile_ms": median_ms(&mut compile),
            "hits": HITS,
            "hit_ms": median_ms(&mut hit),
        }));
    }
    println!("{}", serde_json::json!({ "modules": out }));
    Ok(())
}

fn median_ms(xs: &mut [Duration]) -> f64 {
    xs.sort();
    xs[xs.len() / 2].as_secs_f64() * 1e3
}

/// `functions` small exported functions and a `data`-byte segment of
/// incompressible bytes.
fn big_module(functions: usize, data: usize) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut wat = String::with_capacity(functions * 300 + data * 3 + 100);
    wat.push_str("(module (memory 128)\n");
    for i in 0..functions {
        let _ = write!(
            wat,
            "(func (export \"f{i}\") (param i64 i64) (result i64) (local i64)\n\
             local.get 0 i64.const {i} i64.mul local.get 1 i64.add local.set 2\n\
             local.get 2 i64.const 13 i64.rotl local.get 0 i64.xor local.set 2\n\
             local.get 2 i64.const {i} i64.add local.get 1 i64.const 5 i64.shr_u i64.sub\n\
             local.get 2 i64.const 2654435761 i64.mul i64.add i32.const 0 i64.load offset={} drop)\n",
            i % 1000
        );
    }
    wat.push_str("(data (i32.const 0) \"");
    let mut x: u32 = 0x1234_5678;
    for _ in 0..data {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let _ = write!(wat, "\\{:02x}", x as u8);
    }
    wat.push_str("\"))\n");
    wat::parse_str(&wat).expect("valid generated wat")
}
