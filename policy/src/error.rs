//! Errors of loading a policy: one [`Diagnostic`] per problem, each naming
//! the file, line, column and key path, collected so that one run reports
//! every mistake, not only the first.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file, as named on the command line or found in `policy.d/`.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem is about the file as a whole.
    pub line: usize,
    /// 1-based column in characters, 0 when the problem is about the file.
    pub column: usize,
    /// Dotted key path, e.g. `apps.web.pool.max`; empty for syntax errors.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The main policy file (or a drop-in) could not be read.
    #[error("{}: cannot read the policy file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The drop-in directory exists but could not be listed.
    #[error("{}: cannot list the drop-in directory: {source}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The files were read but contain mistakes; every one is listed.
    #[error("{}", Invalid(.0))]
    Invalid(Vec<Diagnostic>),
}

impl PolicyError {
    /// The individual problems, for callers that print or serialize them.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            PolicyError::Invalid(list) => list.clone(),
            PolicyError::Read { path, source } => vec![Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the policy file: {source}"),
            }],
            PolicyError::ReadDir { path, source } => vec![Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot list the drop-in directory: {source}"),
            }],
        }
    }
}

struct Invalid<'a>(&'a [Diagnostic]);

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
