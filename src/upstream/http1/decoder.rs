//! Where a response body from Tallyfy ends (RFC 9112 §6.3, §7.1): a pure,
//! incremental decoder over the bytes read so far.
//!
//! Data comes out as slices of the read buffer (no copy). Chunk extensions and
//! trailer fields are read past and dropped, as nginx drops them; a size line
//! or trailer section longer than the limits below is a broken response, not a
//! reason to buffer without end.

use bytes::{Bytes, BytesMut};

/// The longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_SIZE_LINE: usize = 4 * 1024;
/// The most trailer-section bytes accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// How the rest of one response body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    /// `Content-Length`: this many bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// Neither: the body ends when Tallyfy closes the connection.
    UntilClose,
    /// The body has ended.
    Done,
}

/// Where in the chunked coding the decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes still to come.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section; this many bytes of it read.
    Trailers(usize),
}

/// The response body does not follow its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Malformed {}

impl Decoder {
    /// The next piece of body data in `buffer`, taken from it. `Ok(None)`: more
    /// bytes must be read first, or the body has ended ([`Decoder::is_done`]).
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Bytes>, Malformed> {
        loop {
            match self {
                Decoder::Done => return Ok(None),
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(None);
                }
                Decoder::Length(remaining) => {
                    if buffer.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buffer.len());
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Some(buffer.split_to(take).freeze()));
                }
                Decoder::UntilClose => {
                    return Ok((!buffer.is_empty()).then(|| buffer.split().freeze()));
                }
                Decoder::Chunked(state) => match step(state, buffer)? {
                    Step::Data(data) => return Ok(Some(data)),
                    Step::Again => {}
                    Step::NeedMore => return Ok(None),
                    Step::End => *self = Decoder::Done,
                },
            }
        }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    /// The body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(remaining) => Some(*remaining),
            Decoder::Done => Some(0),
            Decoder::Chunked(_) | Decoder::UntilClose => None,
        }
    }
}

enum Step {
    Data(Bytes),
    /// The state moved on; decode again.
    Again,
    NeedMore,
    End,
}

fn step(state: &mut Chunked, buffer: &mut BytesMut) -> Result<Step, Malformed> {
    match *state {
        // A size line starts with a hex digit and holds no bare LF (httparse
        // alone would take an empty size as the last chunk).
        Chunked::Size if buffer.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
            Err(Malformed("a chunk-size line without a size"))
        }
        Chunked::Size => match httparse::parse_chunk_size(buffer) {
            Ok(httparse::Status::Complete((line, _)))
                if buffer[..line - 1].contains(&b'\n') || buffer[line - 2] != b'\r' =>
            {
                Err(Malformed("a chunk-size line not ended by CRLF"))
            }
            Ok(httparse::Status::Complete((line, size))) => {
                let _ = buffer.split_to(line);
                *state = if size == 0 { Chunked::Trailers(0) } else { Chunked::Data(size) };
                Ok(Step::Again)
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_SIZE_LINE => Ok(Step::NeedMore),
            Ok(httparse::Status::Partial) => Err(Malformed("a chunk-size line too long")),
            Err(_) => Err(Malformed("an invalid chunk size")),
        },
        Chunked::Data(remaining) => {
            if buffer.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(buffer.len());
            let left = remaining - take as u64;
            *state = if left == 0 { Chunked::DataEnd } else { Chunked::Data(left) };
            Ok(Step::Data(buffer.split_to(take).freeze()))
        }
        Chunked::DataEnd => match buffer.get(..2) {
            None if buffer.first().is_none_or(|&b| b == b'\r') => Ok(Step::NeedMore),
            Some([b'\r', b'\n']) => {
                let _ = buffer.split_to(2);
                *state = Chunked::Size;
                Ok(Step::Again)
            }
            _ => Err(Malformed("chunk data not followed by CRLF")),
        },
        Chunked::Trailers(read) => {
            let Some(end) = buffer.iter().position(|&b| b == b'\n') else {
                return if read + buffer.len() < MAX_TRAILERS {
                    Ok(Step::NeedMore)
                } else {
                    Err(Malformed("a trailer section too long"))
                };
            };
            let line = buffer.split_to(end + 1);
            if line.len() < 2 || line[end - 1] != b'\r' {
                return Err(Malformed("a trailer line not ended by CRLF"));
            }
            if line.len() == 2 {
                return Ok(Step::End);
            }
            let read = read + line.len();
            if read >= MAX_TRAILERS {
                return Err(Malformed("a trailer section too long"));
            }
            *state = Chunked::Trailers(read);
            Ok(Step::Again)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `wire` to a decoder in pieces cut at `cuts`; the data and whether it ended.
    fn decode_in_pieces(
        mut decoder: Decoder,
        wire: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, bool, usize), Malformed> {
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(wire.len())).collect();
        points.push(wire.len());
        points.sort_unstable();
        for point in points {
            buffer.extend_from_slice(&wire[fed..point.max(fed)]);
            fed = point.max(fed);
            while let Some(piece) = decoder.decode(&mut buffer)? {
                data.extend_from_slice(&piece);
            }
        }
        Ok((data, decoder.is_done(), buffer.len()))
    }

    fn chunked() -> Decoder {
        Decoder::Chunked(Chunked::Size)
    }

    #[test]
    fn a_length_takes_exactly_its_bytes_and_leaves_the_rest() {
        let (data, done, left) = decode_in_pieces(Decoder::Length(5), b"helloHTTP/1.1", &[2]).unwrap();
        assert_eq!((data.as_slice(), done, left), (&b"hello"[..], true, 8));
    }

    #[test]
    fn chunks_with_extensions_and_trailers_decode_to_their_data() {
        let wire = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nExpires: never\r\nX-A: b\r\n\r\nNEXT";
        let (data, done, left) = decode_in_pieces(chunked(), wire, &[1, 7, 15, 20, 33, 40]).unwrap();
        assert_eq!((data.as_slice(), done, left), (&b"hello world"[..], true, 4));
    }

    #[test]
    fn a_chunked_body_that_stops_short_has_not_ended() {
        let (data, done, _) = decode_in_pieces(chunked(), b"5\r\nhel", &[]).unwrap();
        assert_eq!((data.as_slice(), done), (&b"hel"[..], false));
        let (_, done, _) = decode_in_pieces(chunked(), b"5\r\nhello\r\n0\r\n", &[]).unwrap();
        assert!(!done, "the last chunk needs its empty trailer line");
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n\r\n",
            b";ext\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nbad\n\r\n",
        ] {
            assert!(decode_in_pieces(chunked(), wire, &[]).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn endless_size_lines_and_trailers_are_cut_off() {
        let mut line = b"5;".to_vec();
        line.extend(std::iter::repeat_n(b'x', MAX_SIZE_LINE));
        assert!(decode_in_pieces(chunked(), &line, &[]).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 8 {
            trailers.extend_from_slice(b"X-A: b\r\n");
        }
        assert!(decode_in_pieces(chunked(), &trailers, &[100, 5000]).is_err());
    }

    #[test]
    fn until_close_takes_everything() {
        let (data, done, _) = decode_in_pieces(Decoder::UntilClose, b"all of it", &[3]).unwrap();
        assert_eq!((data.as_slice(), done), (&b"all of it"[..], false));
    }

    proptest! {
        /// Any body, chunked any way and read in any pieces, decodes to itself
        /// and leaves what follows it in the buffer.
        #[test]
        fn chunked_bodies_decode_to_what_was_chunked(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..90, 1..20),
            cuts in proptest::collection::vec(0usize..800, 0..12),
        ) {
            let mut wire = Vec::new();
            let mut rest = body.as_slice();
            let mut sizes = sizes.iter().cycle();
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at((*sizes.next().unwrap()).min(rest.len()));
                wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                rest = after;
            }
            wire.extend_from_slice(b"0\r\n\r\nGET");
            let (data, done, left) = decode_in_pieces(chunked(), &wire, &cuts).unwrap();
            prop_assert_eq!(data, body);
            prop_assert!(done);
            prop_assert_eq!(left, 3);
        }
    }
}
