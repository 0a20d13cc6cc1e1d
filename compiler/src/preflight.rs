//! What can be decided about an app before it starts, from its module and
//! its [`AppSpec`] alone: that the file is WebAssembly at all, that no
//! memory's declared minimum is above `limits.memory`, that no core module
//! defines more tables than `limits.tables` (the pooling allocator refuses
//! such a module when it loads it, see `engine.rs`), and that what the
//! program exports fits its kind:
//!
//! | kind | needs |
//! |---|---|
//! | `http` | a component exporting `wasi:http/incoming-handler@0.2.x` (WASI 0.2) or `wasi:http/handler@0.3.x` (WASI 0.3) |
//! | `stdio` | a core module exporting `_start`, or a component exporting `wasi:cli/run@0.2.x` or `@0.3.x` |
//! | `command` | a core module exporting `_start`, or a component exporting `wasi:cli/run@0.2.x` or `@0.3.x` |
//!
//! `pool.reuse` needs a WASI 0.3 handler: a 0.2 handler cannot take a
//! second request in one instance.
//!
//! These are the rules the zygote (and `corral run`) apply when they load
//! the program; found here, each is one error at check or reconcile time
//! instead of a crash loop. Nothing is compiled: the binary is only parsed
//! (wasmparser), so a check costs a read of the file. What only
//! compilation or instantiation can tell (invalid code, a missing import)
//! is left to them.

use std::fmt;
use std::path::{Path, PathBuf};

use corral_policy::{AppKind, AppSpec};
use wasmparser::{ComponentExternalKind, ExternalKind, Parser, Payload, TypeRef};

use crate::source::{ProgramKind, Source};

/// The export of a WASI 0.2 http handler (any 0.2.x).
pub const HTTP_HANDLER: &str = "wasi:http/incoming-handler@0.2";
/// The export of a WASI 0.3 http handler (any 0.3.x).
pub const HTTP_SERVICE: &str = "wasi:http/handler@0.3";
/// The export of a WASI 0.2 command component (any 0.2.x).
pub const CLI_RUN: &str = "wasi:cli/run@0.2";
/// The export of a WASI 0.3 command component (any 0.3.x).
pub const CLI_RUN_03: &str = "wasi:cli/run@0.3";

/// The world a program targets, as far as corral tells them apart (from
/// its exports: an http export wins over `wasi:cli/run`, which
/// toolchains export from services too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum World {
    /// A WASI preview1 core module exporting `_start`.
    Preview1Command,
    /// `wasi:cli/command@0.2`.
    Command02,
    /// `wasi:cli/command@0.3`.
    Command03,
    /// `wasi:http/proxy@0.2` (exports `wasi:http/incoming-handler`).
    HttpProxy02,
    /// `wasi:http/service@0.3` (exports `wasi:http/handler`).
    HttpService03,
}

impl World {
    /// The world of a program of kind `found` with `exports` (`None`: none
    /// corral runs).
    pub fn of(found: ProgramKind, exports: &[String]) -> Option<World> {
        let has = |prefix: &str| exports.iter().any(|e| e.starts_with(prefix));
        match found {
            ProgramKind::Module => exports
                .iter()
                .any(|e| e == "_start")
                .then_some(World::Preview1Command),
            ProgramKind::Component => {
                if has(HTTP_SERVICE) {
                    Some(World::HttpService03)
                } else if has(HTTP_HANDLER) {
                    Some(World::HttpProxy02)
                } else if has(CLI_RUN_03) {
                    Some(World::Command03)
                } else if has(CLI_RUN) {
                    Some(World::Command02)
                } else {
                    None
                }
            }
        }
    }

    /// Whether an app of `kind` runs a program of this world.
    pub fn fits(self, kind: AppKind) -> bool {
        match kind {
            AppKind::Http => matches!(self, World::HttpProxy02 | World::HttpService03),
            AppKind::Stdio | AppKind::Command => matches!(
                self,
                World::Preview1Command | World::Command02 | World::Command03
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            World::Preview1Command => "wasi preview1 command",
            World::Command02 => "wasi:cli/command@0.2",
            World::Command03 => "wasi:cli/command@0.3",
            World::HttpProxy02 => "wasi:http/proxy@0.2",
            World::HttpService03 => "wasi:http/service@0.3",
        }
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The world of the program in `source` (read and parsed, not compiled).
pub fn world_of(source: &Source) -> Option<World> {
    let facts = Facts::of(&source.wasm).ok()?;
    World::of(source.kind, &facts.exports)
}

/// One reason `app` cannot run its module, known before it starts.
/// Displays as `app `NAME`: MODULE: what is wrong and what would do`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unfit {
    pub app: String,
    pub module: PathBuf,
    pub problem: Problem,
}

/// What is wrong, for callers that branch on it (each variant's Display is
/// the message).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// Unreadable, not WebAssembly (binary or text), or not parseable; the
    /// reader's message.
    NotWasm(String),
    /// A memory's declared minimum (`index` in its core module's memory
    /// index space, imports first) is above `limits.memory`.
    MemoryMinimum {
        index: u32,
        minimum: u64,
        limit: u64,
    },
    /// A core module defines more tables than `limits.tables`.
    Tables { defined: u32, limit: u32 },
    /// The program kind does not fit the app's kind.
    WrongProgram { kind: AppKind, found: ProgramKind },
    /// The right kind of program, without the export the app's kind needs;
    /// `exports` lists what it does export.
    MissingExport {
        kind: AppKind,
        wanted: &'static str,
        exports: Vec<String>,
    },
    /// `pool.reuse` on a WASI 0.2 http handler.
    ReuseNeedsService,
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "app `{}`: {}: {}",
            self.app,
            self.module.display(),
            self.problem
        )
    }
}

impl std::error::Error for Unfit {}

/// What each kind needs, in words.
fn needs(kind: AppKind) -> &'static str {
    match kind {
        AppKind::Http => {
            "a component exporting wasi:http/incoming-handler@0.2.x or wasi:http/handler@0.3.x"
        }
        AppKind::Stdio | AppKind::Command => {
            "a WASI preview1 command module (exporting `_start`) or a component exporting wasi:cli/run@0.2.x or @0.3.x"
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotWasm(why) => f.write_str(why),
            Problem::MemoryMinimum {
                index,
                minimum,
                limit,
            } => write!(
                f,
                "memory {index} declares a minimum of {} bytes, above limits.memory ({limit} bytes): every instance would fail; raise limits.memory or build the module with a smaller initial memory",
                minimum
            ),
            Problem::Tables { defined, limit } => write!(
                f,
                "a core module defines {defined} tables, above limits.tables ({limit}): raise limits.tables"
            ),
            Problem::WrongProgram { kind, found } => write!(
                f,
                "kind = \"{kind}\" needs {}, and this is a {}",
                needs(*kind),
                match found {
                    ProgramKind::Module => "core module",
                    ProgramKind::Component => "component",
                }
            ),
            Problem::MissingExport {
                kind,
                wanted,
                exports,
            } => {
                write!(
                    f,
                    "kind = \"{kind}\" needs {}; it has no `{wanted}` export",
                    needs(*kind)
                )?;
                if exports.is_empty() {
                    f.write_str(" (it exports nothing)")
                } else {
                    write!(f, " (it exports: {})", exports.join(", "))
                }
            }
            Problem::ReuseNeedsService => f.write_str(
                "pool.reuse needs a WASI 0.3 handler (exporting wasi:http/handler@0.3.x); this is a WASI 0.2 handler (wasi:http/incoming-handler@0.2.x), whose instance serves one request: remove pool.reuse or rebuild the component for WASI 0.3",
            ),
        }
    }
}

/// Read `app.module` (binary or text) and check it against `app`; every
/// problem found, none if it may start. Only the file is read.
pub fn check_app(app: &AppSpec) -> Vec<Unfit> {
    match Source::read(&app.module) {
        Ok(source) => check_source(app, &source),
        Err(e) => vec![unfit(app, &app.module, Problem::NotWasm(e.to_string()))],
    }
}

/// [`check_app`] for a module already read (its `path` is named in the
/// errors).
pub fn check_source(app: &AppSpec, source: &Source) -> Vec<Unfit> {
    let facts = match Facts::of(&source.wasm) {
        Ok(facts) => facts,
        Err(e) => {
            let why = format!(
                "{}: invalid WebAssembly at offset {:#x}: {}",
                source.path.display(),
                e.offset(),
                e.message()
            );
            return vec![unfit(app, &source.path, Problem::NotWasm(why))];
        }
    };
    let mut problems = Vec::new();
    for (index, minimum) in facts.memory_minimums.iter().copied() {
        if minimum > app.limits.memory {
            problems.push(Problem::MemoryMinimum {
                index,
                minimum,
                limit: app.limits.memory,
            });
        }
    }
    if let Some(&defined) = facts.defined_tables.iter().max()
        && defined > app.limits.tables
    {
        problems.push(Problem::Tables {
            defined,
            limit: app.limits.tables,
        });
    }
    problems.extend(world_problem(app, source.kind, &facts.exports));
    problems
        .into_iter()
        .map(|p| unfit(app, &source.path, p))
        .collect()
}

fn unfit(app: &AppSpec, module: &Path, problem: Problem) -> Unfit {
    Unfit {
        app: app.name.clone(),
        module: module.to_path_buf(),
        problem,
    }
}

fn world_problem(app: &AppSpec, found: ProgramKind, exports: &[String]) -> Option<Problem> {
    let kind = app.kind;
    if let (AppKind::Http, ProgramKind::Module) = (kind, found) {
        return Some(Problem::WrongProgram { kind, found });
    }
    match World::of(found, exports) {
        Some(world) if world.fits(kind) => (app.pool.reuse.is_some()
            && world == World::HttpProxy02)
            .then_some(Problem::ReuseNeedsService),
        _ => Some(Problem::MissingExport {
            kind,
            wanted: match (kind, found) {
                (_, ProgramKind::Module) => "_start",
                (AppKind::Http, _) => {
                    "wasi:http/incoming-handler@0.2.x` or `wasi:http/handler@0.3.x"
                }
                _ => "wasi:cli/run@0.2.x` or `wasi:cli/run@0.3.x",
            },
            exports: exports.to_vec(),
        }),
    }
}

/// What the binary declares, as far as the checks need.
#[derive(Debug, Default)]
struct Facts {
    /// (index in its module, minimum bytes) of every memory of every core
    /// module (nested ones included), imports first.
    memory_minimums: Vec<(u32, u64)>,
    /// Defined tables per core module.
    defined_tables: Vec<u32>,
    /// Function exports of a core module, or the top-level exports of a
    /// component.
    exports: Vec<String>,
}

impl Facts {
    fn of(wasm: &[u8]) -> Result<Facts, wasmparser::BinaryReaderError> {
        let mut facts = Facts::default();
        // Nesting depth: 1 is the top-level module or component.
        let mut depth = 0usize;
        // Tables defined by the core module being read.
        let mut tables = 0u32;
        // Memories of the core module being read.
        let mut memories = 0u32;
        for payload in Parser::new(0).parse_all(wasm) {
            match payload? {
                Payload::Version { .. } => {
                    depth += 1;
                    tables = 0;
                    memories = 0;
                }
                Payload::End(_) => {
                    depth = depth.saturating_sub(1);
                    facts.defined_tables.push(tables);
                    tables = 0;
                }
                Payload::ImportSection(reader) => {
                    for import in reader {
                        if let TypeRef::Memory(m) = import?.ty {
                            facts.memory_minimums.push((memories, memory_bytes(&m)));
                            memories += 1;
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        facts
                            .memory_minimums
                            .push((memories, memory_bytes(&memory?)));
                        memories += 1;
                    }
                }
                Payload::TableSection(reader) => tables += reader.count(),
                Payload::ExportSection(reader) if depth == 1 => {
                    for export in reader {
                        let export = export?;
                        if export.kind == ExternalKind::Func {
                            facts.exports.push(export.name.to_string());
                        }
                    }
                }
                Payload::ComponentExportSection(reader) if depth == 1 => {
                    for export in reader {
                        let export = export?;
                        if matches!(
                            export.kind,
                            ComponentExternalKind::Instance | ComponentExternalKind::Func
                        ) {
                            facts.exports.push(export.name.0.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(facts)
    }
}

/// A memory's minimum in bytes (saturating: a minimum that does not fit in
/// 64 bits is above any limit).
fn memory_bytes(m: &wasmparser::MemoryType) -> u64 {
    let page_log2 = m.page_size_log2.unwrap_or(16);
    m.initial
        .saturating_mul(1u64.checked_shl(page_log2).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(kind: AppKind, module: &Path) -> corral_policy::AppSpecBuilder {
        let b = AppSpec::builder("web", module, kind);
        match kind {
            AppKind::Http | AppKind::Stdio => b.listen(corral_policy::ListenAddr::Tcp(
                "127.0.0.1:8080".parse().unwrap(),
            )),
            AppKind::Command => b,
        }
    }

    fn check(
        kind: AppKind,
        wat: &str,
        tweak: impl FnOnce(corral_policy::AppSpecBuilder) -> corral_policy::AppSpecBuilder,
    ) -> Vec<String> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.wat");
        std::fs::write(&path, wat).unwrap();
        let spec = tweak(app(kind, &path)).build().unwrap();
        check_app(&spec).iter().map(ToString::to_string).collect()
    }

    const COMMAND: &str = r#"(module (memory 1) (func (export "_start")))"#;
    const HTTP: &str = r#"(component
        (instance $h)
        (export "wasi:http/incoming-handler@0.2.3" (instance $h)))"#;
    const RUN: &str = r#"(component
        (instance $r)
        (export "wasi:cli/run@0.2.0" (instance $r)))"#;

    #[test]
    fn a_fitting_program_has_no_problem() {
        assert_eq!(check(AppKind::Stdio, COMMAND, |b| b), Vec::<String>::new());
        assert_eq!(
            check(AppKind::Command, COMMAND, |b| b),
            Vec::<String>::new()
        );
        assert_eq!(check(AppKind::Http, HTTP, |b| b), Vec::<String>::new());
        assert_eq!(check(AppKind::Command, RUN, |b| b), Vec::<String>::new());
    }

    #[test]
    fn not_wasm_at_all() {
        let errors = check(AppKind::Command, "#!/bin/sh\necho hi\n", |b| b);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("app `web`: "), "{errors:?}");
        assert!(
            errors[0].contains("m.wat: not a WebAssembly module"),
            "{errors:?}"
        );
        let errors = check(AppKind::Command, "\0asm\x01\0\0\0\x05\x7f", |b| b);
        assert!(
            errors[0].contains("invalid WebAssembly at offset"),
            "{errors:?}"
        );
    }

    #[test]
    fn memory_minimum_above_the_limit() {
        // 65536 pages: 4 GiB of minimum memory under a 64 MiB limit.
        let wat = r#"(module (memory 65536) (func (export "_start")))"#;
        let errors = check(AppKind::Stdio, wat, |b| b.memory(64 << 20));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("memory 0 declares a minimum of 4294967296 bytes, above limits.memory (67108864 bytes)"),
            "{errors:?}"
        );
        // Exactly at the limit is fine; an imported memory counts too.
        assert!(
            check(
                AppKind::Stdio,
                r#"(module (memory 1024) (func (export "_start")))"#,
                |b| b.memory(64 << 20)
            )
            .is_empty()
        );
        let imported = r#"(module (import "env" "m" (memory 2048)) (func (export "_start")))"#;
        let errors = check(AppKind::Stdio, imported, |b| b.memory(64 << 20));
        assert!(
            errors[0].contains("memory 0 declares a minimum of 134217728 bytes"),
            "{errors:?}"
        );
    }

    #[test]
    fn more_tables_than_the_limit() {
        let wat = r#"(module (table 1 funcref) (table 1 funcref) (table 1 funcref)
            (func (export "_start")))"#;
        let errors = check(AppKind::Command, wat, |b| b.tables(2));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("defines 3 tables, above limits.tables (2)"),
            "{errors:?}"
        );
        assert!(check(AppKind::Command, wat, |b| b.tables(3)).is_empty());
    }

    #[test]
    fn a_nested_modules_memory_counts() {
        let wat = r#"(component
            (core module $m (memory 4096))
            (core instance (instantiate $m))
            (instance $h)
            (export "wasi:http/incoming-handler@0.2.0" (instance $h)))"#;
        let errors = check(AppKind::Http, wat, |b| b.memory(64 << 20));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("memory 0 declares a minimum of 268435456 bytes"),
            "{errors:?}"
        );
    }

    #[test]
    fn the_world_against_the_kind() {
        let errors = check(AppKind::Http, COMMAND, |b| b);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("app `web`: /"), "{errors:?}");
        assert!(
            errors[0].ends_with("/m.wat: kind = \"http\" needs a component exporting wasi:http/incoming-handler@0.2.x or wasi:http/handler@0.3.x, and this is a core module"),
            "{errors:?}"
        );
        let errors = check(AppKind::Http, RUN, |b| b);
        assert!(
            errors[0].ends_with("it has no `wasi:http/incoming-handler@0.2.x` or `wasi:http/handler@0.3.x` export (it exports: wasi:cli/run@0.2.0)"),
            "{errors:?}"
        );
        let errors = check(AppKind::Stdio, HTTP, |b| b);
        assert!(
            errors[0].contains("it has no `wasi:cli/run@0.2.x` or `wasi:cli/run@0.3.x` export"),
            "{errors:?}"
        );
        let errors = check(AppKind::Stdio, r#"(module (func (export "main")))"#, |b| b);
        assert!(
            errors[0].ends_with("it has no `_start` export (it exports: main)"),
            "{errors:?}"
        );
        let errors = check(AppKind::Command, HTTP, |b| b);
        assert!(
            errors[0].contains("it has no `wasi:cli/run@0.2.x` or `wasi:cli/run@0.3.x` export"),
            "{errors:?}"
        );
        let errors = check(AppKind::Command, "(module)", |b| b);
        assert!(errors[0].ends_with("(it exports nothing)"), "{errors:?}");
    }

    #[test]
    fn wasi_0_3_worlds_fit_their_kinds() {
        let service = HTTP.replace("incoming-handler@0.2.3", "handler@0.3.0");
        let run3 = RUN.replace("0.2.0", "0.3.0");
        assert!(check(AppKind::Http, &service, |b| b).is_empty());
        assert!(check(AppKind::Command, &run3, |b| b).is_empty());
        // stdio apps may be command components of either version.
        assert!(check(AppKind::Stdio, &run3, |b| b).is_empty());
        assert!(check(AppKind::Stdio, RUN, |b| b).is_empty());
        // A service that also exports wasi:cli/run is a service.
        let both = r#"(component
            (instance $r) (instance $h)
            (export "wasi:cli/run@0.2.0" (instance $r))
            (export "wasi:http/handler@0.3.0" (instance $h)))"#;
        let source = |wat: &str| Source {
            path: "x.wat".into(),
            wasm: wat::parse_str(wat).unwrap(),
            kind: ProgramKind::Component,
            digest: String::new(),
        };
        assert_eq!(world_of(&source(both)), Some(World::HttpService03));
        assert_eq!(world_of(&source(HTTP)), Some(World::HttpProxy02));
        assert_eq!(world_of(&source(&run3)), Some(World::Command03));
        assert_eq!(World::HttpService03.to_string(), "wasi:http/service@0.3");
    }

    #[test]
    fn reuse_needs_a_0_3_handler() {
        let reuse = |b: corral_policy::AppSpecBuilder| {
            b.reuse(corral_policy::Reuse {
                requests: 128,
                concurrent: 16,
            })
        };
        let errors = check(AppKind::Http, HTTP, reuse);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("pool.reuse needs a WASI 0.3 handler"),
            "{errors:?}"
        );
        let service = HTTP.replace("incoming-handler@0.2.3", "handler@0.3.0");
        assert!(check(AppKind::Http, &service, reuse).is_empty());
    }

    #[test]
    fn every_problem_at_once() {
        let wat = r#"(module (memory 65536) (table 1 funcref) (table 1 funcref))"#;
        let errors = check(AppKind::Http, wat, |b| b.memory(64 << 20).tables(1));
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
