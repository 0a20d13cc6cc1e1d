//! Cache hit against compile, for a small module and a generated ~10 MB one
//! (about 3 MB of code in 20,000 functions plus a 7 MB data segment).
//!
//! `cargo bench -p corral-compiler --bench cache`
//!
//! - `compile/*`: `Source::precompile`, what a miss costs;
//! - `hit/*`: `Cache::load_or_compile` on a hit, everything included: stat
//!   the source and find its remembered SHA-256 (`<cache>/sources/`), open,
//!   pin, BLAKE3 the artifact, map it;
//! - `hit-source-in-memory/*`: the same with a `Source` already built
//!   (`load_or_compile_source`).

use std::path::Path;
use std::time::Duration;

use corral_compiler::{Cache, EngineOptions, Source, new_engine};
use criterion::{Criterion, criterion_group, criterion_main};

fn small_module() -> Vec<u8> {
    wat::parse_str(
        r#"(module (memory 1) (func (export "add") (param i32 i32) (result i32)
            local.get 0 local.get 1 i32.add))"#,
    )
    .expect("valid wat")
}

/// About 10 MB: `functions` small functions and a `data` byte segment.
fn big_module(functions: usize, data: usize) -> Vec<u8> {
    let mut wat = String::with_capacity(functions * 200 + data * 3 + 100);
    wat.push_str("(module (memory 128)\n");
    for i in 0..functions {
        wat.push_str(&format!(
            "(func (export \"f{i}\") (param i64 i64) (result i64) (local i64)\n\
             local.get 0 i64.const {i} i64.mul local.get 1 i64.add local.set 2\n\
             local.get 2 i64.const 13 i64.rotl local.get 0 i64.xor local.set 2\n\
             local.get 2 i64.const {i} i64.add local.get 1 i64.const 5 i64.shr_u i64.sub\n\
             local.get 2 i64.const 2654435761 i64.mul i64.add i32.const 0 i64.load offset={} drop)\n",
            i % 1000
        ));
    }
    wat.push_str("(data (i32.const 0) \"");
    let mut x: u32 = 0x1234_5678;
    for _ in 0..data {
        // xorshift: incompressible, like real assets.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        wat.push_str(&format!("\\{:02x}", x as u8));
    }
    wat.push_str("\"))\n");
    wat::parse_str(&wat).expect("valid generated wat")
}

fn bench_module(c: &mut Criterion, name: &str, wasm: Vec<u8>, dir: &Path) {
    let engine = new_engine(&EngineOptions::default_for_cli()).expect("engine");
    let cache = Cache::open(&dir.join("cache")).expect("cache");
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, &wasm).expect("write module");
    let source = Source::read(&path).expect("read module");
    eprintln!(
        "{name}: module {} bytes, artifact {} bytes",
        wasm.len(),
        cache
            .load_or_compile(&engine, &path)
            .expect("compile")
            .meta
            .artifact_size
    );

    let mut group = c.benchmark_group("compile");
    group.sample_size(10).warm_up_time(Duration::from_millis(1));
    group.bench_function(name, |b| {
        b.iter(|| source.precompile(&engine).expect("compile"))
    });
    group.finish();

    let mut group = c.benchmark_group("hit");
    group.bench_function(name, |b| {
        b.iter(|| {
            let a = cache.load_or_compile(&engine, &path).expect("hit");
            assert!(a.cache_hit);
            a
        })
    });
    group.finish();

    let mut group = c.benchmark_group("hit-source-in-memory");
    group.bench_function(name, |b| {
        b.iter(|| {
            let a = cache.load_or_compile_source(&engine, &source).expect("hit");
            assert!(a.cache_hit);
            a
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    bench_module(c, "small", small_module(), tmp.path());
    bench_module(c, "10MB", big_module(20_000, 7 << 20), tmp.path());
}

criterion_group!(cache, benches);
criterion_main!(cache);
