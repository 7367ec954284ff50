//! Secrets kept secret (PROTOCOL.md section 7, "Secrets"): passwords and PINs read from a file
//! or an environment variable instead of the command line (which `ps` shows to every user),
//! tokens masked in text that goes to a log, and files and folders holding secrets created
//! private to the owner (`0600` files, `0700` folders).

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("give only one of --{0}, --{0}-file and --{0}-env")]
    Ambiguous(&'static str),
    #[error("--{flag}-file {path}: {source}")]
    File {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("--{flag}-file {path}: not UTF-8 text")]
    NotText { flag: &'static str, path: PathBuf },
    #[error("--{flag}-env {var}: variable not set or not UTF-8")]
    Env { flag: &'static str, var: String },
}

/// One secret given as a literal, a file or an environment variable (at most one of them).
/// A file's content counts without one trailing newline (`\n` or `\r\n`), so `echo pw > f`
/// works; an environment variable is taken as is.
pub fn resolve(
    flag: &'static str,
    literal: Option<&str>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<String>, SecretError> {
    let given =
        usize::from(literal.is_some()) + usize::from(file.is_some()) + usize::from(env.is_some());
    if given > 1 {
        return Err(SecretError::Ambiguous(flag));
    }
    if let Some(path) = file {
        let bytes = std::fs::read(path).map_err(|source| SecretError::File {
            flag,
            path: path.to_path_buf(),
            source,
        })?;
        let mut text = String::from_utf8(bytes).map_err(|_| SecretError::NotText {
            flag,
            path: path.to_path_buf(),
        })?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        return Ok(Some(text));
    }
    if let Some(var) = env {
        return std::env::var(var).map(Some).map_err(|_| SecretError::Env {
            flag,
            var: var.to_string(),
        });
    }
    Ok(literal.map(str::to_string))
}

/// `text` with every token value masked: `token=VALUE` in URLs and `"token":"VALUE"` in JSON
/// become `token=***` / `"token":"***"`. For log lines that show message bodies.
pub fn mask_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let url = rest.find("token=").map(|i| (i, i + "token=".len()));
        let json = rest
            .find("\"token\":\"")
            .map(|i| (i, i + "\"token\":\"".len()));
        // The earlier of the two patterns; `.1` is where its value starts.
        let (_, value) = match (url, json) {
            (Some(u), Some(j)) => {
                if u.0 <= j.0 {
                    u
                } else {
                    j
                }
            }
            (Some(u), None) => u,
            (None, Some(j)) => j,
            (None, None) => break,
        };
        out.push_str(&rest[..value]);
        out.push_str("***");
        let tail = &rest[value..];
        let end = tail
            .find(['&', '"', ' ', '\r', '\n', ';', '>', ','])
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Creates `dir` and its missing parents with mode `0700` (existing folders keep theirs).
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes sure `file` exists with mode `0600` (created so, or narrowed if it was wider): the
/// metadata database holds digest hashes, PIN hashes and tokens.
pub fn ensure_private_file(file: &Path) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)?;
    let meta = std::fs::metadata(file)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n\n").unwrap();
        assert_eq!(
            resolve("password", None, Some(&f), None)
                .unwrap()
                .as_deref(),
            Some("s3cret\n")
        );
        std::fs::write(&f, "s3cret\r\n").unwrap();
        assert_eq!(
            resolve("password", None, Some(&f), None)
                .unwrap()
                .as_deref(),
            Some("s3cret")
        );
        std::fs::write(&f, "s3cret").unwrap();
        assert_eq!(
            resolve("password", None, Some(&f), None)
                .unwrap()
                .as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn env_literal_and_conflicts() {
        std::env::set_var("CALLVAULT_TEST_SECRET_X", "from-env");
        assert_eq!(
            resolve("pin", None, None, Some("CALLVAULT_TEST_SECRET_X"))
                .unwrap()
                .as_deref(),
            Some("from-env")
        );
        assert!(matches!(
            resolve("pin", None, None, Some("CALLVAULT_TEST_SECRET_UNSET")),
            Err(SecretError::Env { .. })
        ));
        assert_eq!(
            resolve("pin", Some("1"), None, None).unwrap().as_deref(),
            Some("1")
        );
        assert_eq!(resolve("pin", None, None, None).unwrap(), None);
        assert!(matches!(
            resolve("pin", Some("1"), None, Some("X")),
            Err(SecretError::Ambiguous("pin"))
        ));
        let missing = Path::new("/nonexistent/pw");
        assert!(matches!(
            resolve("pin", None, Some(missing), None),
            Err(SecretError::File { .. })
        ));
    }

    #[test]
    fn masks_tokens_in_urls_and_json() {
        let s = r#"{"upload_url":"http://h/v1/stores/s/data?token=abcDEF","token":"xyz","n":1}"#;
        let m = mask_tokens(s);
        assert!(!m.contains("abcDEF") && !m.contains("xyz"), "{m}");
        assert_eq!(
            m,
            r#"{"upload_url":"http://h/v1/stores/s/data?token=***","token":"***","n":1}"#
        );
        assert_eq!(mask_tokens("a?token=q&b=1"), "a?token=***&b=1");
        assert_eq!(mask_tokens("no secrets"), "no secrets");
    }

    #[test]
    fn private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_private_dir_all(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let f = d.join("db");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        ensure_private_file(&f).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }
}
