//! A WASI 0.3 `wasi:cli/command` for corral's tests; what it does is its
//! first argument:
//!
//! - `hello` (or none): prints `hello from a WASI 0.3 command`
//! - `exit N`: exits with status N
//! - `echo`: copies stdin to stdout until end of input (a stdio app's
//!   connection, as an inetd service would)
//! - `spin`: a busy loop; `hang`: awaits a future nobody writes
//! - `grow N`: allocates N MiB, then says so

use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_future, wit_stream};

wasip3::cli::command::export!(Cli);

struct Cli;

async fn print(text: String) {
    let (mut tx, rx) = wit_stream::new();
    futures::join!(
        async { wasip3::cli::stdout::write_via_stream(rx).await.ok() },
        async {
            tx.write_all(text.into_bytes()).await;
            drop(tx);
        }
    );
}

impl wasip3::exports::cli::run::Guest for Cli {
    async fn run() -> Result<(), ()> {
        let args = wasip3::cli::environment::get_arguments();
        let mut args = args.iter().skip(1).map(String::as_str);
        match args.next().unwrap_or("hello") {
            "hello" => print("hello from a WASI 0.3 command\n".into()).await,
            "exit" => {
                let code: u8 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                wasip3::cli::exit::exit_with_code(code);
            }
            "echo" => {
                let (mut stdin, stdin_done) = wasip3::cli::stdin::read_via_stream();
                let (mut tx, rx) = wit_stream::new();
                futures::join!(
                    async { wasip3::cli::stdout::write_via_stream(rx).await.ok() },
                    async {
                        let mut buf = Vec::with_capacity(16 * 1024);
                        loop {
                            let (result, data) = stdin.read(buf).await;
                            match result {
                                StreamResult::Complete(_) => {
                                    if !tx.write_all(data).await.is_empty() {
                                        break;
                                    }
                                    buf = Vec::with_capacity(16 * 1024);
                                }
                                StreamResult::Dropped | StreamResult::Cancelled => break,
                            }
                        }
                        drop(tx);
                    }
                );
                drop(stdin_done);
            }
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hang" => {
                let (_never_written, never) =
                    wit_future::new::<Result<(), wasip3::cli::types::ErrorCode>>(|| Ok(()));
                let n = never.await;
                print(format!("unreachable {n:?}\n")).await;
            }
            "grow" => {
                let mb: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                let v = vec![1u8; mb << 20];
                let sum: u64 = std::hint::black_box(&v).iter().step_by(4096).map(|&b| u64::from(b)).sum();
                print(format!("grew {mb} MiB ({sum})\n")).await;
            }
            other => {
                print(format!("unknown command {other}\n")).await;
                return Err(());
            }
        }
        Ok(())
    }
}
