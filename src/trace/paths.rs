//! Lexical path arithmetic for paths the kernel has not resolved for us
//! (failed calls): join to a base directory and fold `.` and `..`.

/// Whether joining `path` as text could name another file than the walk
/// the kernel made of it: a `..` after a name, which the kernel takes from
/// where that name led (a symlink's target), not from the name.
pub fn climbs_after_a_name(path: &[u8]) -> bool {
    let mut named = false;
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if named => return true,
            b".." => {}
            _ => named = true,
        }
    }
    false
}

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
    use super::{absolute, climbs_after_a_name};

    #[test]
    fn a_climb_after_a_name_is_told_from_one_before_any() {
        for (path, climbs) in [
            (&b"lnk/../x"[..], true),
            (b"a/./../b", true),
            (b"../x", false),
            (b"./../../x", false),
            (b"/../etc", false),
            (b"a/b/c", false),
            (b"a/..b", false),
        ] {
            assert_eq!(climbs_after_a_name(path), climbs, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn folds_relative_and_dot_components() {
        assert_eq!(absolute("/tmp/a", "b/../c/./d"), "/tmp/a/c/d");
        assert_eq!(absolute("/tmp", "/etc//passwd"), "/etc/passwd");
        assert_eq!(absolute("/", "../../x"), "/x");
        assert_eq!(absolute("/tmp", "."), "/tmp");
        assert_eq!(absolute("/tmp", ".."), "/");
    }
}
