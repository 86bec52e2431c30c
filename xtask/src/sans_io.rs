//! `cargo xtask sans-io` (also a step of `test`): the sans-IO parts of the code never read the
//! clock nor start tasks or threads. Time comes in as an argument and work is handed back to a
//! driver; that is what lets their tests run an hour of call time in milliseconds, and what
//! keeps the two (the state machine and its driver) from disagreeing about when "now" is.
//!
//! A plain text scan, not a lint: the files are few and the forbidden calls are spelled one way
//! in this code base. Test code (an item under `#[cfg(test)]`) may use the clock to seed its
//! virtual time. An exception goes in [`ALLOWED`] with its reason and exact count; the list may
//! only shrink: a count that drops below its entry fails too, so the entry is cut to match.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Files (or directories, every `.rs` under them) that must stay sans-IO.
const SANS_IO: &[&str] = &[
    "client-core/src/call.rs",
    "client-core/src/quality.rs",
    "client-core/src/congestion",
    "client-core/src/congestion.rs",
    "client-core/src/media",
    "client-core/src/e2ee",
    "turn/src/core.rs",
    "turn/src/stun.rs",
    "turn/src/auth.rs",
    "turn/src/peer.rs",
];

/// What they may not call.
const FORBIDDEN: &[&str] = &[
    "Instant::now",
    "SystemTime",
    "tokio::spawn",
    "thread::spawn",
];

/// Exceptions: (file, forbidden call, how many times, why). Shrink it; never grow it.
const ALLOWED: &[(&str, &str, usize, &str)] = &[];

/// Checks every sans-IO file under `root`; the error lists each offence.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let mut found: Vec<(String, &str, usize)> = Vec::new();
    for file in files(root) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let rel = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .to_string_lossy()
            .replace('\\', "/");
        for &call in FORBIDDEN {
            let lines = offending_lines(&text, call);
            if lines.is_empty() {
                continue;
            }
            found.push((rel.clone(), call, lines.len()));
            let allowed = ALLOWED
                .iter()
                .find(|(f, c, _, _)| *f == rel && *c == call)
                .map_or(0, |(_, _, n, _)| *n);
            if lines.len() > allowed {
                let at: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                problems.push(format!(
                    "{rel}: `{call}` on line {} (sans-IO code takes time as an argument and hands work to its driver)",
                    at.join(", ")
                ));
            }
        }
    }
    for (file, call, allowed, _) in ALLOWED {
        let now = found
            .iter()
            .find(|(f, c, _)| f == file && c == call)
            .map_or(0, |(_, _, n)| *n);
        if now < *allowed {
            problems.push(format!(
                "{file}: `{call}` is allowed {allowed} times but appears {now}: shrink the entry in xtask/src/sans_io.rs"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("sans-IO check failed:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in SANS_IO {
        let path = root.join(entry);
        if path.is_dir() {
            collect(&path, &mut out);
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The 1-based lines of `text` outside test items and comments where `call` appears.
fn offending_lines(text: &str, call: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    // Inside a `#[cfg(test)]` item: the brace depth at which it ends (`None` outside).
    let mut test_item: Option<i64> = None;
    let mut pending_test = false;
    let mut depth: i64 = 0;
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim();
        if trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
        }
        let in_test = test_item.is_some() || pending_test;
        if !in_test && code.contains(call) {
            lines.push(i + 1);
        }
        for c in code.chars() {
            match c {
                '{' => {
                    if pending_test && test_item.is_none() {
                        test_item = Some(depth);
                        pending_test = false;
                    }
                    depth += 1;
                }
                '}' => {
                    depth -= 1;
                    if test_item == Some(depth) {
                        test_item = None;
                    }
                }
                _ => {}
            }
        }
        // `#[cfg(test)] use ...;` or `mod tests;`: an item without a body.
        if pending_test && test_item.is_none() && trimmed.ends_with(';') {
            pending_test = false;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_count_outside_test_items_and_comments_only() {
        let text = "fn f() {\n    let t = Instant::now();\n}\n// Instant::now() in a comment\n\
                    #[cfg(test)]\nmod tests {\n    fn g() { Instant::now(); }\n}\n\
                    fn h() { std::thread::spawn(|| {}); }\n\
                    #[cfg(test)]\nuse std::time::Instant;\nfn k() { Instant::now(); }\n";
        assert_eq!(offending_lines(text, "Instant::now"), vec![2, 12]);
        assert_eq!(offending_lines(text, "thread::spawn"), vec![9]);
        assert!(offending_lines(text, "SystemTime").is_empty());
    }

    #[test]
    fn the_workspace_s_sans_io_code_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        check(root).unwrap();
    }
}
