//! SSH's wire encoding (RFC 4251 §5) read strictly from a packet: every length is
//! checked against the bytes that are left before anything is taken, and a string
//! read as a structure must be used up exactly.
//!
//! Why not ssh-key's decoders straight away: they allocate (and zero) the length a
//! string claims before reading it, up to 1 MiB, and some of them leave part of a
//! string unread, so the next field is read from the wrong place. Hostile bytes reach
//! them only after a walk here has proved every length true.

/// A reader over the bytes of one SSH structure.
#[derive(Debug, Clone, Copy)]
pub struct Wire<'a> {
    rest: &'a [u8],
}

/// Why a structure does not read: which field, and what was wrong (fixed text only,
/// never the bytes read).
pub type WireError = String;

impl<'a> Wire<'a> {
    /// Reads `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Wire { rest: bytes }
    }

    /// The bytes not yet read.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// `n` raw bytes.
    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], WireError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or_else(|| format!("{field}: truncated"))?;
        self.rest = tail;
        Ok(head)
    }

    /// A `byte`.
    pub fn u8(&mut self, field: &str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    /// A `uint32`, big endian.
    pub fn u32(&mut self, field: &str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `uint64`, big endian.
    pub fn u64(&mut self, field: &str) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_be_bytes(b))
    }

    /// A `string` (or `mpint`): a `uint32` length, then that many bytes, all present.
    pub fn string(&mut self, field: &str) -> Result<&'a [u8], WireError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len).map_err(|_| format!("{field}: truncated"))?;
        self.take(len, field)
    }

    /// A `string` of exactly `len` bytes (a key of a fixed size).
    pub fn string_of(&mut self, len: usize, field: &str) -> Result<&'a [u8], WireError> {
        let s = self.string(field)?;
        if s.len() != len {
            return Err(format!("{field}: {} bytes, not {len}", s.len()));
        }
        Ok(s)
    }

    /// A `string` to be read as a structure of its own.
    pub fn nested(&mut self, field: &str) -> Result<Wire<'a>, WireError> {
        self.string(field).map(Wire::new)
    }

    /// Everything was read.
    pub fn end(&self, what: &str) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("bytes after the {what}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_before_anything_is_taken() {
        let mut w = Wire::new(b"\0\0\0\x03abcd");
        assert_eq!(w.string("s").unwrap(), b"abc");
        assert_eq!(w.end("thing").unwrap_err(), "bytes after the thing");
        assert_eq!(w.u8("b").unwrap(), b'd');
        assert!(w.end("thing").is_ok());
        // a string claiming 1 MiB out of 5 bytes is refused, not allocated
        let mut w = Wire::new(b"\0\x10\0\0x");
        assert_eq!(w.string("nonce").unwrap_err(), "nonce: truncated");
        let mut w = Wire::new(b"\0\0\0\x02ab");
        assert_eq!(w.string_of(32, "key").unwrap_err(), "key: 2 bytes, not 32");
        assert_eq!(Wire::new(b"\0\0\x01").u32("n").unwrap_err(), "n: truncated");
        assert_eq!(Wire::new(&[0, 0, 0, 0, 0, 0, 1, 0]).u64("t").unwrap(), 256);
    }
}
