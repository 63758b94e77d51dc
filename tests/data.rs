//! The CIFAR-10 data module: synthetic data round trip, batches (normalisation, NHWC order,
//! augmentation, determinism across threads), epoch orders, rejection of bad files, and the
//! download against a local HTTP server (127.0.0.1 only, a bounded number of requests).

use incept::data::{
    self, check, epoch_order, is_empty_location, make_batch, write_synthetic, Augment, Cifar10,
    Source, Split, CLASSES, MEAN, RECORD, STD, TEST_FILE, TRAIN_FILES,
};
use md5::{Digest, Md5};
use sha2::Sha256;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;

fn synthetic(train: usize, test: usize) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar");
    write_synthetic(&dir, train, test, 7).unwrap();
    (tmp, dir)
}

fn error_of<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn synthetic_round_trip() {
    let (_tmp, dir) = synthetic(103, 40);
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let size = fs::metadata(dir.join(name)).unwrap().len() as usize;
        assert_eq!(size % RECORD, 0, "{name}");
    }
    // 103 = 5·20 + 3: the first three files get one record more.
    assert_eq!(fs::metadata(dir.join(TRAIN_FILES[0])).unwrap().len() as usize, 21 * RECORD);
    assert_eq!(fs::metadata(dir.join(TRAIN_FILES[4])).unwrap().len() as usize, 20 * RECORD);

    let train = Cifar10::open(&dir, Split::Train).unwrap();
    let test = Cifar10::open(&dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (103, 40));
    assert!(!train.is_empty());
    let counts = train.class_counts();
    assert_eq!(counts.iter().sum::<usize>(), 103);
    assert!(counts.iter().all(|&c| c == 10 || c == 11), "{counts:?}");
    assert_eq!(test.class_counts(), [4; 10]);
    let mut recount = [0usize; 10];
    for i in 0..train.len() {
        assert!(train.label(i) < 10);
        assert_eq!(train.image(i).len(), PIXELS);
        recount[usize::from(train.label(i))] += 1;
    }
    assert_eq!(recount, counts);
    // Records cross file boundaries in order: record 21 is the first of data_batch_2.bin.
    let second = fs::read(dir.join(TRAIN_FILES[1])).unwrap();
    assert_eq!(train.label(21), second[0]);
    assert_eq!(train.image(21), &second[1..RECORD]);

    // Deterministic in the seed, different across seeds.
    let again = tempfile::tempdir().unwrap();
    write_synthetic(again.path(), 103, 40, 7).unwrap();
    assert_eq!(
        fs::read(dir.join(TEST_FILE)).unwrap(),
        fs::read(again.path().join(TEST_FILE)).unwrap()
    );
    write_synthetic(again.path(), 103, 40, 8).unwrap();
    assert_ne!(
        fs::read(dir.join(TEST_FILE)).unwrap(),
        fs::read(again.path().join(TEST_FILE)).unwrap()
    );

    let report = check(&dir).unwrap();
    assert!(report.contains("train: 103 records"), "{report}");
    assert!(report.contains("test: 40 records"), "{report}");
    assert!(report.contains("data_batch_1.bin 21"), "{report}");
    assert!(report.contains(&format!("{:<10} {:>6}", "truck", 4)), "{report}");
    assert!(report.contains("synthetic or partial"), "{report}");

    assert!(write_synthetic(&dir, 4, 10, 0).is_err(), "fewer records than files");
    assert!(write_synthetic(&dir, 10, 0, 0).is_err(), "no test records");
}

/// The classes must be learnable: a nearest-class-mean classifier on pixels, fitted on the
/// training split, does far better than chance on the test split, but not perfectly.
#[test]
fn synthetic_classes_are_learnable_but_not_trivial() {
    let (_tmp, dir) = synthetic(1000, 500);
    let train = Cifar10::open(&dir, Split::Train).unwrap();
    let test = Cifar10::open(&dir, Split::Test).unwrap();
    let mut means = vec![[0f64; PIXELS]; 10];
    for i in 0..train.len() {
        let mean = &mut means[usize::from(train.label(i))];
        for (m, &p) in mean.iter_mut().zip(train.image(i)) {
            *m += f64::from(p);
        }
    }
    for (mean, count) in means.iter_mut().zip(train.class_counts()) {
        mean.iter_mut().for_each(|m| *m /= count as f64);
    }
    let correct = (0..test.len())
        .filter(|&i| {
            let distance = |mean: &[f64; PIXELS]| -> f64 {
                mean.iter().zip(test.image(i)).map(|(m, &p)| (m - f64::from(p)).powi(2)).sum()
            };
            let best = (0..10)
                .min_by(|&a, &b| distance(&means[a]).total_cmp(&distance(&means[b])))
                .unwrap();
            best == usize::from(test.label(i))
        })
        .count();
    let accuracy = correct as f64 / test.len() as f64;
    assert!(accuracy > 0.3, "nearest mean accuracy {accuracy}");
    assert!(accuracy < 0.98, "nearest mean accuracy {accuracy}");
}

fn normalised(byte: u8, c: usize) -> f32 {
    (byte as f32 / 255.0 - MEAN[c]) / STD[c]
}

#[test]
fn batch_without_augmentation_is_exact_nhwc() {
    let (_tmp, dir) = synthetic(50, 10);
    let ds = Cifar10::open(&dir, Split::Train).unwrap();
    let indices = [3, 0, 41, 17];
    let (mut x, mut y) = (vec![1.0; 7], vec![99; 9]);
    make_batch(&ds, &indices, Augment::NONE, 1, 2, 3, &mut x, &mut y);
    assert_eq!(x.len(), indices.len() * PIXELS);
    let labels: Vec<u32> = indices.iter().map(|&i| u32::from(ds.label(i))).collect();
    assert_eq!(y, labels);
    for (n, &i) in indices.iter().enumerate() {
        let image = ds.image(i);
        for row in 0..SIDE {
            for col in 0..SIDE {
                for c in 0..3 {
                    let got = x[((n * SIDE + row) * SIDE + col) * 3 + c];
                    let want = normalised(image[c * 1024 + row * SIDE + col], c);
                    assert_eq!(got, want, "image {n} row {row} col {col} channel {c}");
                }
            }
        }
    }
    // One pixel by hand: record 41, row 5, column 9, green.
    let byte = ds.image(41)[1024 + 5 * 32 + 9];
    assert_eq!(x[((2 * 32 + 5) * 32 + 9) * 3 + 1], (byte as f32 / 255.0 - 0.4822) / 0.2435);
    // A shorter batch shrinks the buffers.
    make_batch(&ds, &[5], Augment::NONE, 1, 2, 3, &mut x, &mut y);
    assert_eq!((x.len(), y.len()), (PIXELS, 1));
}

fn batch(ds: &Cifar10, indices: &[usize], aug: Augment, epoch: u64, first: u64) -> Vec<f32> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    make_batch(ds, indices, aug, 11, epoch, first, &mut x, &mut y);
    x
}

#[test]
fn batches_are_deterministic_across_threads_and_batch_cuts() {
    let (_tmp, dir) = synthetic(100, 10);
    let ds = Cifar10::open(&dir, Split::Train).unwrap();
    let indices: Vec<usize> = epoch_order(ds.len(), 11, 4)[..64].to_vec();
    let reference = batch(&ds, &indices, Augment::TRAIN, 4, 64);
    assert_eq!(reference, batch(&ds, &indices, Augment::TRAIN, 4, 64));
    for threads in [1, 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let x = pool.install(|| batch(&ds, &indices, Augment::TRAIN, 4, 64));
        assert!(x == reference, "{threads} threads");
    }
    // The augmentation follows the position in the epoch, not the batch it falls in.
    let mut halves = batch(&ds, &indices[..40], Augment::TRAIN, 4, 64);
    halves.extend(batch(&ds, &indices[40..], Augment::TRAIN, 4, 104));
    assert!(halves == reference);
    // Another epoch, another augmentation.
    assert!(batch(&ds, &indices, Augment::TRAIN, 5, 64) != reference);
}

#[test]
fn crop_and_flip_change_images_as_torchvision_would() {
    let (_tmp, dir) = synthetic(100, 10);
    let ds = Cifar10::open(&dir, Split::Train).unwrap();
    let indices: Vec<usize> = (0..64).collect();
    let plain = batch(&ds, &indices, Augment::NONE, 0, 0);
    let train = batch(&ds, &indices, Augment::TRAIN, 0, 0);
    let images = |x: &[f32]| -> Vec<Vec<f32>> { x.chunks(PIXELS).map(<[f32]>::to_vec).collect() };
    let (plain, train) = (images(&plain), images(&train));
    let changed = plain.iter().zip(&train).filter(|(a, b)| a != b).count();
    assert!(changed > 48, "only {changed} of 64 images changed");

    // Flip only: each image is the original or its exact mirror, and both happen.
    let flip = Augment { crop: false, flip: true };
    let flipped = images(&batch(&ds, &indices, flip, 0, 0));
    let mirror = |image: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0; PIXELS];
        for row in 0..SIDE {
            for col in 0..SIDE {
                for c in 0..3 {
                    out[(row * SIDE + col) * 3 + c] = image[(row * SIDE + SIDE - 1 - col) * 3 + c];
                }
            }
        }
        out
    };
    let mut mirrored = 0;
    for (f, p) in flipped.iter().zip(&plain) {
        if *f == mirror(p) {
            mirrored += 1;
        } else {
            assert_eq!(f, p, "neither the image nor its mirror");
        }
    }
    assert!((10..=54).contains(&mirrored), "{mirrored} of 64 mirrored");

    // Crop only: each image is the original shifted by at most 4 pixels, with the padding
    // normalised as black (byte 0).
    let crop = Augment { crop: true, flip: false };
    let cropped = images(&batch(&ds, &indices, crop, 0, 0));
    let mut padded = 0;
    for (k, (got, orig)) in cropped.iter().zip(&plain).enumerate() {
        let shift =
            (-4..=4isize).flat_map(|dy| (-4..=4isize).map(move |dx| (dy, dx))).find(|&(dy, dx)| {
                (0..SIDE).all(|row| {
                    (0..SIDE).all(|col| {
                        let (sy, sx) = (row as isize + dy, col as isize + dx);
                        let inside = (0..32).contains(&sy) && (0..32).contains(&sx);
                        (0..3).all(|c| {
                            let want = if inside {
                                orig[((sy as usize) * SIDE + sx as usize) * 3 + c]
                            } else {
                                normalised(0, c)
                            };
                            got[(row * SIDE + col) * 3 + c] == want
                        })
                    })
                })
            });
        let (dy, dx) = shift.unwrap_or_else(|| panic!("image {k} is no shifted crop"));
        if (dy, dx) != (0, 0) {
            padded += 1;
        }
    }
    assert!(padded > 48, "only {padded} of 64 crops moved");
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let order = epoch_order(1000, 3, 0);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_ne!(order, sorted, "not shuffled");
    assert_eq!(order, epoch_order(1000, 3, 0));
    assert_ne!(order, epoch_order(1000, 3, 1), "same order in two epochs");
    assert_ne!(order, epoch_order(1000, 4, 0), "same order for two seeds");
    assert!(epoch_order(0, 1, 1).is_empty());
    assert_eq!(epoch_order(1, 1, 1), vec![0]);
}

#[test]
fn bad_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();

    let absent = tmp.path().join("nowhere");
    let e = error_of(Cifar10::open(&absent, Split::Train));
    assert!(e.contains("data_batch_1.bin") && e.contains("does not exist"), "{e}");
    assert!(e.contains("incept train --download"), "{e}");
    assert!(e.contains("cifar-10-binary.tar.gz"), "{e}");
    assert!(is_empty_location(&absent));

    let (_keep, dir) = synthetic(50, 10);
    assert!(!is_empty_location(&dir));
    fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    let e = error_of(Cifar10::open(&dir, Split::Train));
    assert!(e.contains("data_batch_4.bin") && e.contains("not found"), "{e}");
    assert!(e.contains("incept train --download"), "{e}");
    let e = error_of(check(&dir));
    assert!(e.contains("data_batch_4.bin"), "{e}");
    // The test split is still whole.
    assert_eq!(Cifar10::open(&dir, Split::Test).unwrap().len(), 10);

    // Truncated: one byte short.
    let (_keep, dir) = synthetic(50, 10);
    let file = fs::OpenOptions::new().write(true).open(dir.join("data_batch_2.bin")).unwrap();
    file.set_len(10 * RECORD as u64 - 1).unwrap();
    drop(file);
    let e = error_of(Cifar10::open(&dir, Split::Train));
    assert!(e.contains("data_batch_2.bin") && e.contains("30729"), "{e}");
    assert!(e.contains("truncated"), "{e}");

    // Label 12 in record 3.
    let (_keep, dir) = synthetic(50, 10);
    let path = dir.join(TEST_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[3 * RECORD] = 12;
    fs::write(&path, bytes).unwrap();
    let e = error_of(Cifar10::open(&dir, Split::Test));
    assert!(e.contains(TEST_FILE) && e.contains("record 3") && e.contains("label 12"), "{e}");

    // Empty file.
    let (_keep, dir) = synthetic(50, 10);
    fs::write(dir.join("data_batch_5.bin"), b"").unwrap();
    let e = error_of(Cifar10::open(&dir, Split::Train));
    assert!(e.contains("data_batch_5.bin") && e.contains("empty"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Download against a local server.

/// Serves `body` to the next `requests` connections on 127.0.0.1, then stops; gives up
/// waiting after a few seconds so a test that fails early cannot leave it hanging.
fn serve(body: Vec<u8>, requests: usize) -> (String, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < requests && Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            assert!(request.starts_with(b"GET "), "not a GET");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            // The client may hang up early (it refuses a wrong Content-Length).
            let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
            served += 1;
        }
        served
    });
    (url, handle)
}

/// A gzip'd tar shaped like the official archive holding a small synthetic data set, plus
/// members that must never be written: a path escaping with `..`, a file outside the
/// folder, a symlink under an expected name, and a folder entry.
fn archive() -> Vec<u8> {
    let (_tmp, dir) = synthetic(50, 20);
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(encoder);
    let regular = |size: usize| {
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header
    };
    // `Header::set_path` refuses `..`, so the hostile name is written into the raw field.
    let evil = b"evil payload\n";
    let mut header = regular(evil.len());
    let name = b"cifar-10-batches-bin/../evil.txt";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_cksum();
    tar.append(&header, &evil[..]).unwrap();

    let mut header = regular(evil.len());
    header.set_path("evil.sh").unwrap();
    header.set_cksum();
    tar.append(&header, &evil[..]).unwrap();

    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_path("cifar-10-batches-bin/").unwrap();
    header.set_mode(0o755);
    header.set_size(0);
    header.set_cksum();
    tar.append(&header, std::io::empty()).unwrap();

    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    tar.append_link(&mut header, "cifar-10-batches-bin/batches.meta.txt", "../evil.txt").unwrap();

    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let bytes = fs::read(dir.join(name)).unwrap();
        let mut header = regular(bytes.len());
        header.set_path(format!("cifar-10-batches-bin/{name}")).unwrap();
        header.set_cksum();
        tar.append(&header, bytes.as_slice()).unwrap();
    }
    let readme = b"<html>synthetic</html>";
    let mut header = regular(readme.len());
    header.set_path("cifar-10-batches-bin/readme.html").unwrap();
    header.set_cksum();
    tar.append(&header, &readme[..]).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn source_for(url: &str, body: &[u8]) -> Source {
    Source {
        url: url.to_string(),
        size: body.len() as u64,
        md5: hex(&Md5::digest(body)),
        sha256: hex(&Sha256::digest(body)),
    }
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn download_installs_only_the_expected_members() {
    let body = archive();
    let (url, server) = serve(body.clone(), 1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("parent").join("cifar");
    assert!(is_empty_location(&dir));
    data::download(&dir, &source_for(&url, &body)).unwrap();
    assert_eq!(server.join().unwrap(), 1);

    assert_eq!(Cifar10::open(&dir, Split::Train).unwrap().len(), 50);
    assert_eq!(Cifar10::open(&dir, Split::Test).unwrap().len(), 20);
    assert!(!is_empty_location(&dir));
    let mut want = vec!["parent".to_string(), "parent/cifar".to_string()];
    for name in TRAIN_FILES.iter().chain([&TEST_FILE, &"readme.html"]) {
        want.push(format!("parent/cifar/{name}"));
    }
    want.sort();
    // No evil.txt, evil.sh or link anywhere, and no temporary left behind.
    assert_eq!(tree(tmp.path()), want);
}

#[test]
fn download_with_a_bad_checksum_or_size_leaves_nothing() {
    let body = archive();
    let good = source_for("", &body);
    let bad = [
        ("MD5", Source { md5: "0".repeat(32), ..good.clone() }),
        ("SHA-256", Source { sha256: "0".repeat(64), ..good.clone() }),
        ("bytes", Source { size: good.size + 1, ..good.clone() }),
    ];
    let (url, server) = serve(body.clone(), bad.len());
    let tmp = tempfile::tempdir().unwrap();
    // A folder that already holds a file of the same name: it must survive untouched.
    let dir = tmp.path().join("cifar");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join(TEST_FILE), b"old").unwrap();
    for (what, source) in bad {
        let source = Source { url: url.clone(), ..source };
        let e = error_of(data::download(&dir, &source));
        assert!(e.contains(what) && e.contains(&url), "{e}");
        assert!(e.contains("offline"), "{e}");
        assert_eq!(tree(tmp.path()), ["cifar", "cifar/test_batch.bin"], "{what}");
        assert_eq!(fs::read(dir.join(TEST_FILE)).unwrap(), b"old");
    }
    assert_eq!(server.join().unwrap(), 3);

    // Into a folder that does not exist yet: it still does not exist afterwards.
    let (url, server) = serve(body.clone(), 1);
    let fresh = tmp.path().join("fresh");
    let source = Source { url, sha256: "f".repeat(64), ..good };
    let e = error_of(data::download(&fresh, &source));
    assert!(e.contains("SHA-256 checksum mismatch"), "{e}");
    assert!(!fresh.exists());
    assert_eq!(server.join().unwrap(), 1);
}

#[test]
fn download_from_an_unreachable_server_names_the_url() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar");
    let source = Source { url: url.clone(), ..Source::official() };
    let e = error_of(data::download(&dir, &source));
    assert!(e.contains(&url), "{e}");
    assert!(e.contains("offline") && e.contains(&dir.display().to_string()), "{e}");
    assert!(tree(tmp.path()).is_empty(), "{:?}", tree(tmp.path()));
}

#[test]
fn official_source() {
    let s = Source::official();
    assert_eq!(s.url, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz");
    assert_eq!(s.size, 170_052_171);
    assert_eq!(s.md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert_eq!(s.sha256, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd");
    assert_eq!(CLASSES.len(), 10);
}
