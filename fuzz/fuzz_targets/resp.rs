//! The RESP command parser (what the KN server reads from clients) and the reply parser
//! (what `dinomo bench --target` and the tests read from servers), fed arbitrary bytes
//! under the default limits and under tight ones.
//!
//! Checked besides "no panic": a parsed command or reply reports a length within the input
//! and parses the same from exactly that many bytes; a command honours the limits; a
//! command re-encoded as an array of bulk strings parses back to the same arguments; a
//! [`CommandParser`] fed the stream in two pieces (as a server reading a socket is) finds
//! the same commands as one-shot parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;

use dinomo_shared::resp::{encode_command, parse_command, parse_value, CommandParser, Limits};

/// The commands a resuming parser finds in `data` fed as two pieces split at `cut`, up to
/// the first error or incomplete command.
fn resumed(data: &[u8], cut: usize, limits: &Limits) -> Vec<Vec<Vec<u8>>> {
    let mut p = CommandParser::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match p.feed(&buf, limits) {
                Ok((n, Some(args))) => {
                    buf.drain(..n);
                    out.push(args);
                }
                Ok((n, None)) => {
                    buf.drain(..n);
                    break;
                }
                Err(_) => return out,
            }
        }
    }
    out
}

fn check_stream(data: &[u8], limits: &Limits) {
    let mut whole = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let buf = &data[at..];
        let Ok(Some((args, n))) = parse_command(buf, limits) else {
            break;
        };
        assert!(n > 0 && n <= buf.len(), "consumed {n} of {}", buf.len());
        whole.push(args.clone());
        assert!(args.len() <= limits.max_args, "{} arguments", args.len());
        if buf[0] == b'*' {
            assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
        }
        assert_eq!(
            parse_command(&buf[..n], limits),
            Ok(Some((args.clone(), n))),
            "a command must not depend on the bytes after it"
        );
        if !args.is_empty() {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut enc = Vec::new();
            encode_command(&mut enc, &refs);
            let roomy = Limits {
                max_bulk: usize::MAX,
                max_args: usize::MAX,
                max_inline: usize::MAX,
            };
            assert_eq!(
                parse_command(&enc, &roomy),
                Ok(Some((args, enc.len()))),
                "re-encoded command"
            );
        }
        at += n;
    }
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    assert_eq!(resumed(data, cut, limits), whole, "split at {cut}");

    if let Ok(Some((v, n))) = parse_value(data, limits) {
        assert!(n > 0 && n <= data.len(), "reply took {n} of {}", data.len());
        assert_eq!(parse_value(&data[..n], limits), Ok(Some((v, n))));
    }
}

fuzz_target!(|data: &[u8]| {
    check_stream(data, &Limits::default());
    let tight = Limits {
        max_bulk: 16,
        max_args: 4,
        max_inline: 32,
    };
    check_stream(data, &tight);
});
