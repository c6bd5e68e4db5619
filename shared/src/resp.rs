//! The Redis protocol (RESP2 and RESP3): a bounded command parser for the KN server, reply
//! encoders, and a reply parser for clients (tests, `dinomo bench --target`).
//!
//! The command parser never allocates for a command that is not complete yet and refuses a
//! length above its limits as soon as it reads the length, so a client cannot make the
//! server buffer more than one oversized header. It accepts RESP arrays of bulk strings
//! and, like Redis, inline commands (a line of space-separated words) for telnet users.

use std::fmt;

/// Limits on what one command may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest bulk string.
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command or length line.
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk: 2 << 20,
            max_args: 1 << 16,
            max_inline: 64 << 10,
        }
    }
}

/// A framing error: the stream cannot be resynchronised, so the server answers with an
/// error and closes the connection (as Redis does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn perr<T>(m: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(m.into()))
}

/// Finds the end of the line starting at `at`: the index of its `\r` (or `\n` for inline).
fn line_end(buf: &[u8], at: usize, max: usize) -> Result<Option<usize>, ProtocolError> {
    let window = &buf[at.min(buf.len())..];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > max => perr("too big line"),
        Some(i) => Ok(Some(at + i)),
        None if window.len() > max => perr("too big line"),
        None => Ok(None),
    }
}

/// Parses the decimal number in `b` (an optional `-` and 1..=19 digits).
fn parse_int(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits
        .iter()
        .fold(0i64, |a, &d| a * 10 + i64::from(d - b'0'));
    Some(if neg { -v } else { v })
}

/// Reads a `<prefix><n>\r\n` line at `at`; returns `n` and where the next byte is.
fn length_line(
    buf: &[u8],
    at: usize,
    prefix: u8,
    limits: &Limits,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some(end) = line_end(buf, at, 32)? else {
        return Ok(None);
    };
    if buf[at] != prefix {
        return perr(format!(
            "expected '{}', got '{}'",
            prefix as char,
            (buf[at] as char).escape_default()
        ));
    }
    if end == at || buf[end - 1] != b'\r' {
        return perr("length line not terminated by CRLF");
    }
    let _ = limits;
    match parse_int(&buf[at + 1..end - 1]) {
        Some(n) => Ok(Some((n, end + 1))),
        None => perr(if prefix == b'*' {
            "invalid multibulk length"
        } else {
            "invalid bulk length"
        }),
    }
}

/// A parsed command's arguments and the bytes it took.
pub type Parsed = Option<(Vec<Vec<u8>>, usize)>;

/// Parses one command from the start of `buf`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((args, consumed)))`: a command (possibly empty, for a blank inline line or
/// `*0`), and how many bytes it took.
///
/// A one-shot use of [`CommandParser`]; a server reading a stream keeps one parser per
/// connection instead, so that an incomplete command is never parsed again from its start.
pub fn parse_command(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    let mut p = CommandParser::default();
    let mut at = 0;
    loop {
        let (n, cmd) = p.feed(&buf[at..], limits)?;
        at += n;
        if let Some(args) = cmd {
            return Ok(Some((args, at)));
        }
        // `feed` stops only when the command is complete or the bytes ran out.
        if n == 0 || at >= buf.len() {
            return Ok(None);
        }
    }
}

/// What [`CommandParser::feed`] did: bytes consumed, and the command once complete.
pub type Fed = (usize, Option<Vec<Vec<u8>>>);

/// A command parser that resumes where it stopped.
///
/// [`CommandParser::feed`] consumes what it has finished with: the header of a multibulk,
/// each complete bulk string (copied out into the command being built). The bytes of a
/// bulk string that is not complete yet stay with the caller and are only counted, never
/// scanned again, so a command that arrives in many reads costs time linear in its size.
/// [`CommandParser::held`] tells how many bytes of an incomplete command the parser holds,
/// which a server adds to its unparsed input to enforce a query-buffer limit.
#[derive(Debug, Default)]
pub struct CommandParser {
    /// The multibulk being read, if its header was.
    pending: Option<Pending>,
    /// Bytes of an incomplete inline line already searched for its end.
    inline_scanned: usize,
    /// Bytes looked at so far (what "never re-parsed" is checked against).
    examined: u64,
}

#[derive(Debug)]
struct Pending {
    /// Arguments still to come.
    remaining: usize,
    args: Vec<Vec<u8>>,
    /// Bytes copied into `args`.
    held: usize,
    /// The length of the bulk string whose header was read but whose data was not.
    bulk: Option<usize>,
}

impl CommandParser {
    /// Bytes of the incomplete command held by the parser (complete arguments so far).
    pub fn held(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.held)
    }

    /// Whether a command is partly parsed.
    pub fn in_command(&self) -> bool {
        self.pending.is_some()
    }

    /// How many input bytes the parser has looked at since it was made: at most a small
    /// constant times the bytes of the commands it was fed, however they were split.
    pub fn examined(&self) -> u64 {
        self.examined
    }

    /// Continues parsing with `buf`, the bytes after those consumed so far. Returns how
    /// many bytes of `buf` were consumed and, once one is complete, the command (possibly
    /// empty, for a blank inline line or `*0`). An error leaves the stream unusable.
    pub fn feed(&mut self, buf: &[u8], limits: &Limits) -> Result<Fed, ProtocolError> {
        let mut at = 0;
        let p = match &mut self.pending {
            Some(p) => p,
            None => {
                let Some(&first) = buf.first() else {
                    return Ok((0, None));
                };
                if first != b'*' {
                    return self.inline(buf, limits);
                }
                let Some((n, next)) = length_line(buf, 0, b'*', limits)? else {
                    self.examined += buf.len().min(34) as u64;
                    return Ok((0, None));
                };
                self.examined += next as u64;
                if n <= 0 {
                    return Ok((next, Some(Vec::new())));
                }
                if n as u64 > limits.max_args as u64 {
                    return perr("invalid multibulk length");
                }
                at = next;
                self.pending.insert(Pending {
                    remaining: n as usize,
                    args: Vec::with_capacity((n as usize).min(64)),
                    held: 0,
                    bulk: None,
                })
            }
        };
        while p.remaining > 0 {
            let len = match p.bulk {
                Some(len) => len,
                None => {
                    if at >= buf.len() {
                        return Ok((at, None));
                    }
                    let Some((len, start)) = length_line(buf, at, b'$', limits)? else {
                        self.examined += (buf.len() - at).min(34) as u64;
                        return Ok((at, None));
                    };
                    self.examined += (start - at) as u64;
                    if len < 0 {
                        return perr("invalid bulk length");
                    }
                    if len as u64 > limits.max_bulk as u64 {
                        // Say why: a value over the node's limit is refused here, from its
                        // header, before any of its bytes are buffered.
                        return perr(format!(
                            "bulk length {len} exceeds the limit of {} bytes",
                            limits.max_bulk
                        ));
                    }
                    at = start;
                    p.bulk = Some(len as usize);
                    len as usize
                }
            };
            if buf.len() - at < len + 2 {
                return Ok((at, None));
            }
            if &buf[at + len..at + len + 2] != b"\r\n" {
                return perr("bulk string not terminated by CRLF");
            }
            self.examined += (len + 2) as u64;
            p.args.push(buf[at..at + len].to_vec());
            p.held += len;
            p.bulk = None;
            p.remaining -= 1;
            at += len + 2;
        }
        let args = self.pending.take().map(|p| p.args).unwrap_or_default();
        Ok((at, Some(args)))
    }

    /// An inline command; the search for its end resumes where the last one stopped.
    fn inline(&mut self, buf: &[u8], limits: &Limits) -> Result<Fed, ProtocolError> {
        let from = self.inline_scanned.min(buf.len());
        let found = buf[from..].iter().position(|&b| b == b'\n');
        let end = match found {
            Some(i) => from + i,
            None => {
                self.examined += (buf.len() - from) as u64;
                if buf.len() > limits.max_inline {
                    return perr("too big inline request");
                }
                self.inline_scanned = buf.len();
                return Ok((0, None));
            }
        };
        self.examined += (end + 1 - from) as u64;
        self.inline_scanned = 0;
        if end > limits.max_inline {
            return perr("too big inline request");
        }
        let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
        let args: Vec<Vec<u8>> = line
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|w| !w.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        if args.len() > limits.max_args {
            return perr("too many arguments");
        }
        Ok((end + 1, Some(args)))
    }
}

// ----- replies -----

/// Which protocol a connection speaks (`HELLO 3` switches to RESP3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Resp2,
    Resp3,
}

/// Appends reply frames to a buffer.
#[derive(Debug)]
pub struct Out<'a> {
    pub buf: &'a mut Vec<u8>,
    pub proto: Proto,
}

impl Out<'_> {
    pub fn simple(&mut self, s: &str) {
        self.line(b'+', s.as_bytes());
    }
    /// An error line; `msg` starts with its code (`ERR`, `MOVED`, ...). Line breaks in it
    /// are replaced so the frame stays well-formed.
    pub fn error(&mut self, msg: &str) {
        let clean: String = msg
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        self.line(b'-', clean.as_bytes());
    }
    pub fn int(&mut self, v: i64) {
        self.number(b':', v);
    }
    pub fn bulk(&mut self, b: &[u8]) {
        self.number(b'$', b.len() as i64);
        self.buf.extend_from_slice(b);
        self.buf.extend_from_slice(b"\r\n");
    }
    pub fn null(&mut self) {
        match self.proto {
            Proto::Resp2 => self.buf.extend_from_slice(b"$-1\r\n"),
            Proto::Resp3 => self.buf.extend_from_slice(b"_\r\n"),
        }
    }
    pub fn array(&mut self, n: usize) {
        self.number(b'*', n as i64);
    }
    /// A null array (an `EXEC` whose watched keys changed): RESP2 `*-1`, RESP3 `_`.
    pub fn null_array(&mut self) {
        match self.proto {
            Proto::Resp2 => self.buf.extend_from_slice(b"*-1\r\n"),
            Proto::Resp3 => self.buf.extend_from_slice(b"_\r\n"),
        }
    }
    /// A map of `n` pairs (RESP2: an array of `2n` items).
    pub fn map(&mut self, n: usize) {
        match self.proto {
            Proto::Resp2 => self.array(2 * n),
            Proto::Resp3 => self.line(b'%', n.to_string().as_bytes()),
        }
    }
    /// A verbatim text reply (INFO): RESP3 `=`, RESP2 a bulk string.
    pub fn text(&mut self, s: &str) {
        match self.proto {
            Proto::Resp2 => self.bulk(s.as_bytes()),
            Proto::Resp3 => {
                self.line(b'=', (s.len() + 4).to_string().as_bytes());
                self.buf.extend_from_slice(b"txt:");
                self.buf.extend_from_slice(s.as_bytes());
                self.buf.extend_from_slice(b"\r\n");
            }
        }
    }
    /// A frame header `kind` + decimal `v` + CRLF, formatted without allocating (every
    /// reply has one).
    fn number(&mut self, kind: u8, v: i64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = v.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.buf.push(kind);
        if v < 0 {
            self.buf.push(b'-');
        }
        self.buf.extend_from_slice(&digits[at..]);
        self.buf.extend_from_slice(b"\r\n");
    }
    fn line(&mut self, kind: u8, body: &[u8]) {
        self.buf.push(kind);
        self.buf.extend_from_slice(body);
        self.buf.extend_from_slice(b"\r\n");
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply as `(first, last, "host:port")`, slots
/// clamped to the slot space; entries that are not ranges are skipped. `None` if the reply
/// is not an array (a node that is not in cluster mode).
pub fn cluster_slot_ranges(reply: &Value) -> Option<Vec<(u16, u16, String)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let last_slot = i64::from(crate::slot::SLOTS) - 1;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Value::Array(v) = r else { continue };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(n))) =
            (v.first(), v.get(1), v.get(2))
        else {
            continue;
        };
        let (Some(Value::Bulk(host)), Some(Value::Int(port))) = (n.first(), n.get(1)) else {
            continue;
        };
        let (a, b) = ((*a).clamp(0, last_slot), (*b).clamp(0, last_slot));
        if a > b {
            continue;
        }
        let addr = format!("{}:{port}", String::from_utf8_lossy(host));
        out.push((a as u16, b as u16, addr));
    }
    Some(out)
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    let mut o = Out {
        buf,
        proto: Proto::Resp2,
    };
    o.array(args.len());
    for a in args {
        o.bulk(a);
    }
}

/// A reply, as a client sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
    /// RESP3 map.
    Map(Vec<(Value, Value)>),
    /// RESP3 double, boolean, verbatim text and big number, kept as text.
    Other(String),
}

/// Parses one reply from the start of `buf`: `Ok(None)` if incomplete. Depth and sizes are
/// bounded by `limits`.
pub fn parse_value(buf: &[u8], limits: &Limits) -> Result<Option<(Value, usize)>, ProtocolError> {
    parse_value_at(buf, 0, limits, 0)
}

fn parse_value_at(
    buf: &[u8],
    at: usize,
    limits: &Limits,
    depth: u32,
) -> Result<Option<(Value, usize)>, ProtocolError> {
    if depth > 16 {
        return perr("reply nested too deeply");
    }
    if at >= buf.len() {
        return Ok(None);
    }
    let Some(end) = line_end(buf, at, limits.max_inline)? else {
        return Ok(None);
    };
    // The line needs its type byte before the CR: a bare "\r\n" is not a reply.
    if end < at + 2 || buf[end - 1] != b'\r' {
        return perr("reply line not terminated by CRLF");
    }
    let body = &buf[at + 1..end - 1];
    let next = end + 1;
    let text = || String::from_utf8_lossy(body).into_owned();
    let count = |what| {
        parse_int(body)
            .filter(|&n| n >= -1 && n <= limits.max_args as i64)
            .ok_or_else(|| ProtocolError(format!("invalid {what} length")))
    };
    Ok(match buf[at] {
        b'+' => Some((Value::Simple(text()), next)),
        b'-' => Some((Value::Error(text()), next)),
        b':' => match parse_int(body) {
            Some(v) => Some((Value::Int(v), next)),
            None => return perr("invalid integer"),
        },
        b'_' => Some((Value::Nil, next)),
        b',' | b'#' | b'(' => Some((Value::Other(text()), next)),
        b'$' | b'=' | b'!' => {
            let n = parse_int(body)
                .filter(|&n| n >= -1 && n <= limits.max_bulk as i64)
                .ok_or_else(|| ProtocolError("invalid bulk length".into()))?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let stop = next + n as usize;
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            if &buf[stop..stop + 2] != b"\r\n" {
                return perr("bulk string not terminated by CRLF");
            }
            let data = buf[next..stop].to_vec();
            let v = match buf[at] {
                b'$' => Value::Bulk(data),
                b'!' => Value::Error(String::from_utf8_lossy(&data).into_owned()),
                _ => Value::Other(String::from_utf8_lossy(&data).into_owned()),
            };
            Some((v, stop + 2))
        }
        b'*' | b'~' | b'>' => {
            let n = count("array")?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut pos = next;
            for _ in 0..n {
                let Some((v, p)) = parse_value_at(buf, pos, limits, depth + 1)? else {
                    return Ok(None);
                };
                items.push(v);
                pos = p;
            }
            Some((Value::Array(items), pos))
        }
        b'%' => {
            let n = count("map")?.max(0);
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut pos = next;
            for _ in 0..n {
                let Some((k, p)) = parse_value_at(buf, pos, limits, depth + 1)? else {
                    return Ok(None);
                };
                let Some((v, p)) = parse_value_at(buf, p, limits, depth + 1)? else {
                    return Ok(None);
                };
                items.push((k, v));
                pos = p;
            }
            Some((Value::Map(items), pos))
        }
        other => return perr(format!("unknown reply type '{}'", other.escape_ascii())),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn numbers_in_frame_headers_are_decimal() {
        let mut buf = Vec::new();
        let mut o = Out {
            buf: &mut buf,
            proto: Proto::Resp2,
        };
        for v in [0, 7, -1, 10, 12345, i64::MAX, i64::MIN] {
            o.int(v);
        }
        o.bulk(b"abc");
        o.array(0);
        let mut want = String::new();
        for v in [0, 7, -1, 10, 12345, i64::MAX, i64::MIN] {
            want.push_str(&format!(":{v}\r\n"));
        }
        want.push_str("$3\r\nabc\r\n*0\r\n");
        assert_eq!(String::from_utf8(buf).expect("ascii"), want);
    }

    #[test]
    fn cluster_slots_replies_become_ranges() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::Bulk(host.as_bytes().to_vec()),
                Value::Int(port),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(99), node("127.0.0.1", 7001)]),
            // Clamped to the slot space; a reversed or malformed entry is skipped.
            Value::Array(vec![Value::Int(100), Value::Int(99_999), node("h", 7002)]),
            Value::Array(vec![Value::Int(9), Value::Int(3), node("h", 7003)]),
            Value::Array(vec![Value::Int(1)]),
            Value::Int(5),
        ]);
        assert_eq!(
            cluster_slot_ranges(&reply),
            Some(vec![
                (0, 99, "127.0.0.1:7001".to_string()),
                (100, 16383, "h:7002".to_string()),
            ])
        );
        assert_eq!(cluster_slot_ranges(&Value::Error("ERR".into())), None);
    }
    use super::*;
    use proptest::prelude::*;

    fn cmd(args: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_command(&mut b, args);
        b
    }

    #[test]
    fn parses_arrays_inline_and_partial_input() {
        let l = Limits::default();
        let b = cmd(&[b"SET", b"k", b"v\r\nx"]);
        let (args, n) = parse_command(&b, &l).expect("valid").expect("complete");
        assert_eq!(
            args,
            vec![b"SET".to_vec(), b"k".to_vec(), b"v\r\nx".to_vec()]
        );
        assert_eq!(n, b.len());
        for cut in 0..b.len() {
            assert_eq!(parse_command(&b[..cut], &l), Ok(None), "cut at {cut}");
        }
        let (args, n) = parse_command(b"PING  hi\r\nGET", &l)
            .expect("valid")
            .expect("complete");
        assert_eq!(args, vec![b"PING".to_vec(), b"hi".to_vec()]);
        assert_eq!(n, 10);
    }

    #[test]
    fn refuses_oversized_and_malformed_input() {
        let l = Limits {
            max_bulk: 16,
            max_args: 4,
            max_inline: 64,
        };
        // An oversized bulk is refused from its header alone.
        let Err(e) = parse_command(b"*1\r\n$17\r\n", &l) else {
            panic!("an oversized bulk was accepted");
        };
        assert_eq!(
            e.to_string(),
            "Protocol error: bulk length 17 exceeds the limit of 16 bytes"
        );
        assert!(parse_command(b"*5\r\n", &l).is_err());
        assert!(parse_command(b"*1\r\n$-1\r\n", &l).is_err());
        assert!(parse_command(b"*1\r\n+OK\r\n", &l).is_err());
        assert!(parse_command(b"*x\r\n", &l).is_err());
        assert!(parse_command(b"*1\r\n$2\r\nabcd", &l).is_err());
        assert!(parse_command(&[b'a'; 100], &l).is_err());
        assert!(parse_command(b"*99999999999999999999\r\n", &l).is_err());
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let l = Limits::default();
        // Found by the `resp` fuzz target: an empty line inside an array, reached after a
        // bulk string whose length did not match its data.
        assert!(parse_value(b"*2\r\n$1\r\nSET\r\n$-1\r\n", &l).is_err());
        assert!(parse_value(b"\r\n", &l).is_err());
        assert!(parse_value(b"*1\r\n\r\n", &l).is_err());
        assert!(parse_value(b"$1\r\nab\r\n", &l).is_err());
        assert_eq!(
            parse_value(b"$2\r\nab\r\n", &l),
            Ok(Some((Value::Bulk(b"ab".to_vec()), 8)))
        );
    }

    #[test]
    fn replies_round_trip() {
        let mut buf = Vec::new();
        let mut o = Out {
            buf: &mut buf,
            proto: Proto::Resp3,
        };
        o.map(1);
        o.bulk(b"k");
        o.array(3);
        o.int(-5);
        o.null();
        o.error("MOVED 5\r\n x");
        let (v, n) = parse_value(&buf, &Limits::default())
            .expect("valid")
            .expect("complete");
        assert_eq!(n, buf.len());
        assert_eq!(
            v,
            Value::Map(vec![(
                Value::Bulk(b"k".to_vec()),
                Value::Array(vec![
                    Value::Int(-5),
                    Value::Nil,
                    Value::Error("MOVED 5   x".into())
                ])
            )])
        );
    }

    /// Feeds `bytes` to one parser `chunk` bytes at a time, as a server reading a socket
    /// does (the caller keeps what was not consumed).
    fn feed_in_chunks(
        bytes: &[u8],
        chunk: usize,
        l: &Limits,
    ) -> (Vec<Vec<Vec<u8>>>, CommandParser) {
        let mut p = CommandParser::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut cmds = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            pending.extend_from_slice(piece);
            loop {
                let (n, cmd) = p.feed(&pending, l).expect("valid");
                pending.drain(..n);
                match cmd {
                    Some(c) => cmds.push(c),
                    None => break,
                }
            }
        }
        assert!(pending.is_empty() && !p.in_command(), "everything consumed");
        (cmds, p)
    }

    #[test]
    fn an_incomplete_command_is_never_parsed_again_from_its_start() {
        let l = Limits::default();
        // 65 536 one-byte arguments, then a 1 MiB one, then an inline command, arriving
        // in 7-byte reads: the parser resumes each time, so it looks at each byte a
        // bounded number of times (a parser starting over would look ~10^9 times).
        let many: Vec<&[u8]> = std::iter::repeat(&b"x"[..]).take(65_536).collect();
        let big = vec![b'v'; 1 << 20];
        let mut bytes = cmd(&many);
        bytes.extend(cmd(&[b"SET", b"k", &big]));
        bytes.extend_from_slice(b"PING hello\r\n");
        let (cmds, p) = feed_in_chunks(&bytes, 7, &l);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].len(), 65_536);
        assert_eq!(cmds[1][2], big);
        assert_eq!(cmds[2], vec![b"PING".to_vec(), b"hello".to_vec()]);
        assert!(
            p.examined() <= 4 * bytes.len() as u64,
            "{} bytes examined for {} bytes of input",
            p.examined(),
            bytes.len()
        );
    }

    #[test]
    fn the_parser_reports_what_it_holds() {
        let l = Limits::default();
        let mut p = CommandParser::default();
        let (n, cmd) = p
            .feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva", &l)
            .expect("valid");
        assert!(cmd.is_none());
        // The header and two arguments are consumed; "$5\r\n" too, its data is not.
        assert_eq!(n, 4 + 9 + 7 + 4);
        assert_eq!(p.held(), 4);
        let (n, cmd) = p.feed(b"value\r\n", &l).expect("valid");
        assert_eq!(n, 7);
        assert_eq!(
            cmd,
            Some(vec![b"SET".to_vec(), b"k".to_vec(), b"value".to_vec()])
        );
        assert_eq!(p.held(), 0);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let l = Limits { max_bulk: 64, max_args: 8, max_inline: 64 };
            if let Ok(Some((_, n))) = parse_command(&bytes, &l) {
                prop_assert!(n <= bytes.len());
            }
            if let Ok(Some((_, n))) = parse_value(&bytes, &l) {
                prop_assert!(n <= bytes.len());
            }
        }

        #[test]
        fn commands_round_trip_in_any_split(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
            split in 0usize..400,
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let b = cmd(&refs);
            let l = Limits::default();
            let cut = split.min(b.len());
            if cut < b.len() {
                prop_assert_eq!(parse_command(&b[..cut], &l), Ok(None));
            }
            let (got, n) = parse_command(&b, &l).expect("valid").expect("complete");
            prop_assert_eq!(n, b.len());
            prop_assert_eq!(got, args);
        }

        #[test]
        fn any_split_parses_like_the_whole(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
            chunk in 1usize..50,
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut b = cmd(&refs);
            b.extend(cmd(&refs));
            let (cmds, _) = feed_in_chunks(&b, chunk, &Limits::default());
            prop_assert_eq!(cmds, vec![args.clone(), args]);
        }
    }
}
