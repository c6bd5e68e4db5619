//! The cluster secret, and the keyed MACs every host-to-host control exchange is checked with.
//!
//! One 32-byte secret per cluster authenticates KN ↔ manager, `ctl` ↔ manager and KN ↔ DPM
//! (verbs handshake) traffic. It never crosses the network: a peer proves it holds the secret
//! by answering a fresh challenge with an HMAC-SHA256 tag ([`ClusterSecret::tag`]) over a
//! domain string and the exchange's fields, so a recorded answer is useless for any other
//! challenge, message kind or connection.
//!
//! With feature `std` the secret is read from and written to a file that only its owner may
//! read ([`ClusterSecret::load`], [`ClusterSecret::create`]); a file that group or others can
//! read is refused, since anyone who reads it is a member of the cluster.

use core::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the cluster secret.
pub const SECRET_LEN: usize = 32;
/// Bytes of a MAC tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
/// Bytes of a challenge nonce.
pub const NONCE_LEN: usize = 16;

/// A MAC tag.
pub type Tag = [u8; TAG_LEN];
/// A challenge nonce.
pub type Nonce = [u8; NONCE_LEN];

/// The cluster secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; SECRET_LEN]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Why a secret could not be parsed, read or written.
#[derive(Debug)]
pub enum AuthError {
    /// The text is not 64 hexadecimal digits.
    BadHex,
    /// No randomness could be had from the operating system.
    #[cfg(feature = "std")]
    Random(getrandom::Error),
    /// The secret file could not be read or written.
    #[cfg(feature = "std")]
    Io {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    /// The secret file is readable or writable by others than its owner.
    #[cfg(feature = "std")]
    Permissions { path: std::path::PathBuf, mode: u32 },
    /// The secret file belongs to another user.
    #[cfg(feature = "std")]
    Owner {
        path: std::path::PathBuf,
        owner: u32,
        me: u32,
    },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadHex => {
                f.write_str("a cluster secret is 64 hexadecimal digits (32 bytes); this is not one")
            }
            #[cfg(feature = "std")]
            Self::Random(e) => write!(f, "no randomness from the operating system: {e}"),
            #[cfg(feature = "std")]
            Self::Io { path, err } => write!(f, "secret file {}: {err}", path.display()),
            #[cfg(feature = "std")]
            Self::Permissions { path, mode } => write!(
                f,
                "secret file {} has mode {mode:04o}: others could read the secret it holds \
                 (and join the cluster or log in with it); run `chmod 600 {}`",
                path.display(),
                path.display()
            ),
            #[cfg(feature = "std")]
            Self::Owner { path, owner, me } => write!(
                f,
                "secret file {} belongs to uid {owner}, not to this user (uid {me}); \
                 refusing a secret that another user controls",
                path.display()
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for AuthError {}

impl ClusterSecret {
    /// A secret from its bytes.
    pub const fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// The secret as 64 lowercase hexadecimal digits (its file format).
    pub fn to_hex(&self) -> [u8; 2 * SECRET_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 2 * SECRET_LEN];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 15) as usize];
        }
        out
    }

    /// Parses 64 hexadecimal digits, ignoring surrounding white space.
    pub fn parse_hex(text: &str) -> Result<Self, AuthError> {
        let t = text.trim().as_bytes();
        if t.len() != 2 * SECRET_LEN {
            return Err(AuthError::BadHex);
        }
        let digit = |c: u8| -> Result<u8, AuthError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(AuthError::BadHex),
            }
        };
        let mut out = [0u8; SECRET_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (digit(t[2 * i])? << 4) | digit(t[2 * i + 1])?;
        }
        Ok(Self(out))
    }

    fn mac(&self, domain: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        // `new_from_slice` accepts keys of any length, so it cannot fail for 32 bytes.
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        // Every field is length-prefixed, so no two different field lists feed the MAC the
        // same bytes.
        for field in core::iter::once(domain).chain(parts.iter().copied()) {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(field);
        }
        mac
    }

    /// HMAC-SHA256 of `parts` under this secret, separated by `domain` (what the tag is for:
    /// "manager-request", "verbs-client", ...), so a tag made for one purpose never verifies
    /// for another.
    pub fn tag(&self, domain: &[u8], parts: &[&[u8]]) -> Tag {
        self.mac(domain, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is [`Self::tag`] of `domain` and `parts`, compared in constant time.
    pub fn verify(&self, domain: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(domain, parts).verify_slice(tag).is_ok()
    }
}

/// Hexadecimal text of a tag or nonce (for line-based protocols).
#[cfg(feature = "std")]
pub fn to_hex(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses hexadecimal text of exactly `N` bytes.
#[cfg(feature = "std")]
pub fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let t = text.as_bytes();
    if t.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let s = core::str::from_utf8(&t[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(feature = "std")]
mod file {
    use std::fs::{self, OpenOptions};
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    use super::{AuthError, ClusterSecret, Nonce, SECRET_LEN};

    /// A fresh random nonce.
    pub fn nonce() -> Result<Nonce, AuthError> {
        let mut n = [0u8; super::NONCE_LEN];
        getrandom::fill(&mut n).map_err(AuthError::Random)?;
        Ok(n)
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// The largest private file [`read_private_file`] reads: secrets, passwords and ACL
    /// files are small, and a huge one is a mistake (or a device) not worth reading.
    pub const MAX_PRIVATE_FILE: u64 = 1 << 20;

    /// Reads a UTF-8 file that holds secrets (the cluster secret, a `requirepass` file, an
    /// ACL file with passwords), refusing one that group or others may access or that
    /// another user owns: anyone who can read it can log in, and anyone who can write it
    /// can choose the password. Checked on the opened file, so the file checked is the
    /// file read.
    pub fn read_private_file(path: &Path) -> Result<String, AuthError> {
        use std::io::Read as _;
        let io = |err| AuthError::Io {
            path: path.to_path_buf(),
            err,
        };
        let f = fs::File::open(path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let me = euid();
        if meta.uid() != me {
            return Err(AuthError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        let mut text = String::new();
        f.take(MAX_PRIVATE_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_PRIVATE_FILE {
            return Err(io(std::io::Error::other(format!(
                "larger than {MAX_PRIVATE_FILE} bytes"
            ))));
        }
        Ok(text)
    }

    impl ClusterSecret {
        /// A new random secret.
        pub fn generate() -> Result<Self, AuthError> {
            let mut b = [0u8; SECRET_LEN];
            getrandom::fill(&mut b).map_err(AuthError::Random)?;
            Ok(Self(b))
        }

        /// Reads a secret file, refusing one that group or others may access or that
        /// another user owns.
        pub fn load(path: &Path) -> Result<Self, AuthError> {
            let text = read_private_file(path)?;
            Self::parse_hex(&text)
        }

        /// Writes a new random secret to `path`, created with mode 0600; fails if the file
        /// exists (a secret is never silently replaced: members holding it would be locked
        /// out).
        pub fn create(path: &Path) -> Result<Self, AuthError> {
            let secret = Self::generate()?;
            let io = |err| AuthError::Io {
                path: path.to_path_buf(),
                err,
            };
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            let mut line = secret.to_hex().to_vec();
            line.push(b'\n');
            f.write_all(&line).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(secret)
        }

        /// [`Self::load`] if `path` exists, otherwise [`Self::create`].
        pub fn load_or_create(path: &Path) -> Result<Self, AuthError> {
            match Self::create(path) {
                Err(AuthError::Io { err, .. })
                    if err.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    Self::load(path)
                }
                other => other,
            }
        }
    }
}

#[cfg(feature = "std")]
pub use file::{nonce, read_private_file, MAX_PRIVATE_FILE};

/// Whether `addr` (`host:port`, or a bare host such as `127.0.0.1` or `localhost`) names
/// only loopback addresses: the one place a surface may run without the cluster secret.
/// A name that does not resolve is not loopback.
#[cfg(feature = "std")]
pub fn is_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let resolved: Vec<std::net::SocketAddr> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => match (addr, 0).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => return false,
        },
    };
    !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback())
}

/// SHA-256 of a password: what is kept in memory and compared, so that comparing takes
/// the same time whatever the password's length and wherever it differs.
pub fn password_digest(password: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    Sha256::digest(password).into()
}

/// Whether `a == b`, in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    // Keep the compiler from turning the fold back into an early exit.
    core::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_bad_text() {
        let s = ClusterSecret::from_bytes([0xa5; SECRET_LEN]);
        let hex = s.to_hex();
        let text = core::str::from_utf8(&hex).expect("hex is ascii");
        assert_eq!(ClusterSecret::parse_hex(text).expect("parses"), s);
        assert!(ClusterSecret::parse_hex("abc").is_err());
        assert!(ClusterSecret::parse_hex(&"zz".repeat(SECRET_LEN)).is_err());
    }

    #[test]
    fn tags_depend_on_secret_domain_and_every_field() {
        let a = ClusterSecret::from_bytes([1; SECRET_LEN]);
        let b = ClusterSecret::from_bytes([2; SECRET_LEN]);
        let t = a.tag(b"d", &[b"x", b"yz"]);
        assert!(a.verify(b"d", &[b"x", b"yz"], &t));
        assert!(!b.verify(b"d", &[b"x", b"yz"], &t));
        assert!(!a.verify(b"e", &[b"x", b"yz"], &t));
        // Moving a byte between fields changes the tag (fields are length-prefixed).
        assert!(!a.verify(b"d", &[b"xy", b"z"], &t));
        assert!(!a.verify(b"d", &[b"x", b"yz"], &t[..31]));
    }

    #[cfg(feature = "std")]
    #[test]
    fn only_loopback_names_are_loopback() {
        for a in [
            "127.0.0.1",
            "127.0.0.1:7000",
            "[::1]:7000",
            "::1",
            "localhost:7000",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0",
            "0.0.0.0:7000",
            "10.0.0.5:18515",
            "192.0.2.1",
            "no such host:1",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = ClusterSecret::from_bytes([0x42; SECRET_LEN]);
        assert!(!format!("{s:?}").contains("42"));
    }

    #[cfg(feature = "std")]
    #[test]
    fn files_are_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dinomo-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("secret");
        let s = ClusterSecret::create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(ClusterSecret::create(&path).is_err(), "never replaced");
        assert_eq!(ClusterSecret::load(&path).expect("load"), s);
        assert_eq!(ClusterSecret::load_or_create(&path).expect("load"), s);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            ClusterSecret::load(&path),
            Err(AuthError::Permissions { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(feature = "std")]
    #[test]
    fn private_files_are_read_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dinomo-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("pass");
        std::fs::write(&path, "hunter2\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let Err(e) = read_private_file(&path) else {
            panic!("a group-readable file was read");
        };
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_private_file(&path).expect("read"), "hunter2\n");
        assert!(
            read_private_file(&dir).is_err(),
            "a directory is not a file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digests_compare_equal_only_for_equal_passwords() {
        assert!(ct_eq(&password_digest(b"pw"), &password_digest(b"pw")));
        assert!(!ct_eq(&password_digest(b"pw"), &password_digest(b"pW")));
        assert!(!ct_eq(b"ab", b"abc"));
    }
}
