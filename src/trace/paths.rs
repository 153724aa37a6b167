//! Lexical path arithmetic for paths the kernel has not resolved for us
//! (failed calls): join to a base directory and fold `.` and `..`.

/// `path` made absolute against `base` (itself absolute), with `.`, `..`
/// and repeated slashes folded. `..` at the root stays at the root, as the
/// kernel does.
pub fn absolute(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') { [path, ""] } else { [base, path] };
    for part in joined.iter().flat_map(|p| p.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    let mut out = String::with_capacity(base.len() + path.len() + 1);
    for part in &parts {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::absolute;

    #[test]
    fn folds_relative_and_dot_components() {
        assert_eq!(absolute("/tmp/a", "b/../c/./d"), "/tmp/a/c/d");
        assert_eq!(absolute("/tmp", "/etc//passwd"), "/etc/passwd");
        assert_eq!(absolute("/", "../../x"), "/x");
        assert_eq!(absolute("/tmp", "."), "/tmp");
        assert_eq!(absolute("/tmp", ".."), "/");
    }
}
