//! Generations: the binary a set of workers runs, held open so that a deploy that renames or
//! deletes its path changes nothing for them until the next reload.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The binary a generation of workers runs, as it was when the generation started.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Binary {
    /// Where it was found: the configured program, or the path this program was started from.
    pub path: PathBuf,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time.
    pub modified: SystemTime,
    /// Its inode: a deploy by rename always brings a new one.
    pub inode: u64,
    /// The device of its file system.
    pub device: u64,
}

impl Binary {
    /// Whether `other` is the same file, unchanged (same device, inode, size and modification
    /// time: what a deploy by rename or by copy changes).
    pub fn same_file(&self, other: &Self) -> bool {
        (self.device, self.inode, self.len, self.modified)
            == (other.device, other.inode, other.len, other.modified)
    }

    fn of(path: PathBuf, metadata: &std::fs::Metadata) -> Self {
        Self {
            path,
            len: metadata.len(),
            modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            inode: metadata.ino(),
            device: metadata.dev(),
        }
    }
}

impl fmt::Display for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let modified = self
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        write!(
            f,
            "{} ({} bytes, inode {}, modified at {modified} s after the epoch)",
            self.path.display(),
            self.len,
            self.inode
        )
    }
}

/// The path this program was started from, as given (`argv[0]` made absolute), so that a reload
/// follows a symlink a deploy switched (`current -> releases/v5`); `current_exe()` (the file
/// itself) when it was found through `PATH`.
fn started_from() -> io::Result<PathBuf> {
    match std::env::args_os().next().map(PathBuf::from) {
        Some(arg0) if arg0.is_absolute() => Ok(arg0),
        // `components` drops the `.` of `./app`.
        Some(arg0) if arg0.components().count() > 1 => {
            Ok(std::env::current_dir()?.join(arg0).components().collect())
        }
        _ => std::env::current_exe(),
    }
}

/// One generation's program, open: workers are started from the open file, never from its
/// path again.
#[derive(Debug)]
pub(crate) struct Image {
    file: File,
    /// Whether it is an ELF binary, which can be executed from its open file; a script is
    /// executed by its path (its interpreter opens it by name).
    elf: bool,
    pub(crate) binary: Binary,
    pub(crate) generation: u64,
}

impl Image {
    /// The first generation: the configured program, or this very binary (through
    /// `/proc/self/exe`, which still opens it if a deploy already replaced its path).
    pub(crate) fn first(exec: Option<&Path>) -> io::Result<Self> {
        match exec {
            Some(path) => Self::open(path, 1),
            None => {
                let file = File::open("/proc/self/exe")?;
                Self::from_file(file, started_from()?, 1)
            }
        }
    }

    /// Opens the program at `path` for `generation`.
    ///
    /// # Errors
    ///
    /// It does not exist, is not a regular file, or nobody may execute it.
    pub(crate) fn open(path: &Path, generation: u64) -> io::Result<Self> {
        let file = File::open(path)?;
        Self::from_file(file, path.to_owned(), generation)
    }

    fn from_file(file: File, path: PathBuf, generation: u64) -> io::Result<Self> {
        // A spawn puts the worker's link at fd 3 before `exec`: the program must be elsewhere.
        let mut file = File::from(crate::sys::above_ipc_fd(file.into())?);
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        if metadata.mode() & 0o111 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not executable",
            ));
        }
        let mut magic = [0; 4];
        let elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
        Ok(Self {
            binary: Binary::of(path, &metadata),
            file,
            elf,
            generation,
        })
    }

    /// What to execute: the open file (the child inherits it across `fork`, and the kernel
    /// opens it through `/proc/self/fd` before `exec` closes it), or a script's path.
    pub(crate) fn program(&self) -> PathBuf {
        if self.elf {
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        } else {
            self.binary.path.clone()
        }
    }
}
