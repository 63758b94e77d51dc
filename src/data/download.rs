//! The download of CIFAR-10: fetched to a temporary file, size and checksum verified, only
//! the expected members unpacked, then moved into place, so a failure leaves nothing behind.

use super::*;

/// Every member taken from the archive; the first six are the data, the rest documentation.
const MEMBERS: [&str; 8] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
    "readme.html",
];
const DATA_FILES: usize = 6;

/// Where to download from and what to expect.
#[derive(Clone, Debug)]
pub struct Source {
    pub url: String,
    pub size: u64,
    /// Lowercase hex.
    pub md5: String,
    /// Lowercase hex.
    pub sha256: String,
}

impl Source {
    /// The archive published by the authors of CIFAR-10.
    pub fn official() -> Source {
        Source {
            url: OFFICIAL_URL.to_string(),
            size: 170_052_171,
            md5: "c32a1d4ab5d03f1284b67883e8d87530".to_string(),
            sha256: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd".to_string(),
        }
    }
}

/// True when `dir` holds none of the data files (so training may download automatically).
pub fn is_empty_location(dir: &Path) -> bool {
    !MEMBERS[..DATA_FILES].iter().any(|name| dir.join(name).symlink_metadata().is_ok())
}

/// Downloads the archive, verifies its size, MD5 and SHA-256, unpacks only the expected
/// members of `cifar-10-batches-bin/` and moves them into `dir` (the folder that will hold
/// `data_batch_1.bin` ...), replacing files of the same names.
///
/// The archive and the unpacked files live in temporary entries of `dir`'s parent until
/// everything succeeded, including opening both splits; on any failure these are removed and
/// `dir` is left as it was.
pub fn download(dir: &Path, source: &Source) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let stem = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cifar-10".to_string());
    let manual = || {
        format!(
            "If this machine is offline, download {} elsewhere, unpack it and put the files of \
             its {ARCHIVE_DIR}/ folder ({} ... {}, {TEST_FILE}) under {}",
            source.url,
            TRAIN_FILES[0],
            TRAIN_FILES[4],
            dir.display()
        )
    };

    let (archive, file) = Temp::new_file(parent, &format!(".{stem}.download"))?;
    fetch(source, file, &archive.path).map_err(|e| anyhow!("{e:#}. {}", manual()))?;

    let staging = Temp::new_dir(parent, &format!(".{stem}.unpack"))?;
    unpack(&archive.path, &staging.path, &source.url)?;
    drop(archive);
    for split in [Split::Train, Split::Test] {
        Cifar10::open(&staging.path, split).with_context(|| {
            format!("the archive from {} is not usable CIFAR-10 data", source.url)
        })?;
    }
    install(&staging.path, dir)?;
    tracing::info!("CIFAR-10 is in {}", dir.display());
    Ok(())
}

/// A temporary file or folder, removed when dropped, so every early return of [`download`]
/// cleans up after itself.
struct Temp {
    path: PathBuf,
    is_dir: bool,
}

impl Temp {
    /// A new, unique name in `parent`, created by `create` (which must fail if it exists).
    fn create<T>(
        parent: &Path, prefix: &str, mut create: impl FnMut(&Path) -> io::Result<T>,
    ) -> Result<(PathBuf, T)> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        for attempt in 0..100u32 {
            let path =
                parent.join(format!("{prefix}-{}-{nanos}-{attempt}.tmp", std::process::id()));
            match create(&path) {
                Ok(made) => return Ok((path, made)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a temporary file in {}", parent.display())
                    })
                }
            }
        }
        bail!("cannot find a free temporary name in {}", parent.display())
    }

    fn new_file(parent: &Path, prefix: &str) -> Result<(Temp, File)> {
        let (path, file) =
            Temp::create(parent, prefix, |p| File::options().write(true).create_new(true).open(p))?;
        Ok((Temp { path, is_dir: false }, file))
    }

    fn new_dir(parent: &Path, prefix: &str) -> Result<Temp> {
        let (path, ()) = Temp::create(parent, prefix, |p| fs::create_dir(p))?;
        Ok(Temp { path, is_dir: true })
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let removed =
            if self.is_dir { fs::remove_dir_all(&self.path) } else { fs::remove_file(&self.path) };
        if let Err(e) = removed {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Streams `source.url` into `file` while hashing, then checks size and checksums.
fn fetch(source: &Source, file: File, path: &Path) -> Result<()> {
    let url = &source.url;
    // Connection and stalls time out; the transfer as a whole does not, since 170 MB can
    // take long on a slow line.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    tracing::info!("downloading {url} ({} MB)", source.size / 1_000_000);
    let mut response = agent.get(url).call().map_err(|e| anyhow!("cannot download {url}: {e}"))?;
    if let Some(len) = response.body().content_length() {
        if len != source.size {
            bail!(
                "{url} offers {len} bytes where {} were expected: it is not the expected file",
                source.size
            );
        }
    }
    let mut body = response.body_mut().as_reader();
    let mut out = BufWriter::new(file);
    let (mut md5, mut sha256) = (Md5::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 16];
    let mut got: u64 = 0;
    let mut next_tenth = 1;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("download of {url} failed after {got} bytes: {e}"),
        };
        got += n as u64;
        if got > source.size {
            bail!(
                "{url} sent more than the expected {} bytes: it is not the expected file",
                source.size
            );
        }
        md5.update(&buf[..n]);
        sha256.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
        while next_tenth <= 10 && got * 10 >= next_tenth * source.size {
            tracing::info!("downloaded {}% of {url}", next_tenth * 10);
            next_tenth += 1;
        }
    }
    out.flush().with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
    if got != source.size {
        bail!("download of {url} stopped after {got} of {} bytes; try again", source.size);
    }
    for (what, got, want) in [
        ("MD5", hex(&md5.finalize()), &source.md5),
        ("SHA-256", hex(&sha256.finalize()), &source.sha256),
    ] {
        if !got.eq_ignore_ascii_case(want) {
            bail!(
                "{what} checksum mismatch for {url}: got {got}, expected {want}; the download is \
                 corrupt or the file on the server changed"
            );
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Extracts the expected members of the archive at `archive` into `staging`.
pub(super) fn unpack(archive: &Path, staging: &Path, url: &str) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let damaged = || format!("the archive from {url} is damaged");
    for entry in tar.entries().with_context(damaged)? {
        let mut entry = entry.with_context(damaged)?;
        let Some(name) = expected_member(&entry) else {
            let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            tracing::warn!("skipping archive member {shown}");
            continue;
        };
        // The name on disk is our constant, never the archive's bytes, and `create_new`
        // refuses to write through anything already there.
        let dest = staging.join(name);
        let mut out =
            File::options().write(true).create_new(true).open(&dest).with_context(|| {
                format!("cannot create {} (is {name} twice in the archive?)", dest.display())
            })?;
        io::copy(&mut entry, &mut out)
            .with_context(|| format!("cannot unpack {name} from the archive of {url}"))?;
    }
    for name in &MEMBERS[..DATA_FILES] {
        if !staging.join(name).is_file() {
            bail!("the archive from {url} has no {ARCHIVE_DIR}/{name}: it is not the CIFAR-10 binary archive");
        }
    }
    Ok(())
}

/// The file name to extract `entry` as, or `None` to skip it. Only regular files named exactly
/// `cifar-10-batches-bin/<one of MEMBERS>` qualify: links, folders, absolute paths and `..`
/// never do.
fn expected_member<R: Read>(entry: &tar::Entry<R>) -> Option<&'static str> {
    let kind = entry.header().entry_type();
    if !(kind.is_file() || kind == tar::EntryType::Continuous) {
        return None;
    }
    let path = entry.path().ok()?;
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    match parts[..] {
        [folder, file] if folder == ARCHIVE_DIR => {
            MEMBERS.iter().copied().find(|&member| file == member)
        }
        _ => None,
    }
}

/// Moves the files of `staging` into `dir`. Files of the same names already in `dir` are first
/// moved aside into `staging`, so a failure part-way can put everything back.
fn install(staging: &Path, dir: &Path) -> Result<()> {
    let created = !dir.exists();
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let aside = staging.join("previous");
    let names: Vec<&str> =
        MEMBERS.iter().copied().filter(|name| staging.join(name).is_file()).collect();
    let mut moved_aside = Vec::new();
    let mut moved_in = Vec::new();
    let mut moves = || -> io::Result<()> {
        fs::create_dir(&aside)?;
        for &name in &names {
            if dir.join(name).symlink_metadata().is_ok() {
                fs::rename(dir.join(name), aside.join(name))?;
                moved_aside.push(name);
            }
        }
        for &name in &names {
            fs::rename(staging.join(name), dir.join(name))?;
            moved_in.push(name);
        }
        Ok(())
    };
    if let Err(e) = moves() {
        for name in moved_in {
            let _ = fs::remove_file(dir.join(name));
        }
        for name in moved_aside {
            let _ = fs::rename(aside.join(name), dir.join(name));
        }
        if created {
            let _ = fs::remove_dir(dir);
        }
        bail!(
            "cannot move the downloaded files into {} ({e}); it was left as it was",
            dir.display()
        );
    }
    Ok(())
}
