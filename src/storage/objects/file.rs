//! The local-disk object backend: key `a/b/c` is the file `<root>/a/b/c`. A put writes a
//! temporary file beside the target, syncs it and renames it over the target, so a reader
//! sees the old or the new object and a crash leaves no half object under the key.

use std::io::{self, Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, ObjectBackend, ObjectError, ObjectInfo};

/// Objects in a folder of the local disk.
#[derive(Debug, Clone)]
pub struct FileObjects {
    root: PathBuf,
}

impl FileObjects {
    pub fn new(root: PathBuf) -> FileObjects {
        FileObjects { root }
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ObjectError + 'a {
    move |source| ObjectError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ObjectError> + Send + 'static,
) -> Result<T, ObjectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ObjectError::Task(e.to_string()))?
}

fn put_sync(path: &Path, data: &[u8]) -> Result<(), ObjectError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_data())
        .map_err(io_err("write", &tmp));
    if let Err(e) =
        written.and_then(|()| std::fs::rename(&tmp, path).map_err(io_err("rename", path)))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

fn read_range_sync(path: &Path, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ObjectError::NotFound(key.to_string()))
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    f.seek(io::SeekFrom::Start(range.start))
        .map_err(io_err("seek", path))?;
    let want = range.end.saturating_sub(range.start);
    let mut out = Vec::new();
    f.take(want)
        .read_to_end(&mut out)
        .map_err(io_err("read", path))?;
    Ok(Bytes::from(out))
}

#[async_trait]
impl ObjectBackend for FileObjects {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        blocking(move || put_sync(&path, &data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectError> {
        self.get_range(key, 0..u64::MAX).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectError> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || read_range_sync(&path, &key, range)).await
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, ObjectError> {
        let path = self.path(dir)?;
        let dir = dir.to_string();
        blocking(move || {
            let rd = match std::fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_err("list", &path)(e)),
            };
            let mut out = Vec::new();
            for entry in rd {
                let entry = entry.map_err(io_err("list", &path))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Temporary files of puts in flight are not objects.
                if name.starts_with('.') {
                    continue;
                }
                let meta = entry.metadata().map_err(io_err("stat", &path))?;
                if meta.is_file() {
                    out.push(ObjectInfo {
                        key: format!("{dir}/{name}"),
                        size: meta.len(),
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &path)(e)),
        }
    }

    fn describe(&self) -> String {
        format!("file:{}", self.root.display())
    }

    fn is_local(&self) -> bool {
        true
    }
}
