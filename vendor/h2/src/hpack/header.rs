use super::{DecoderError, MalformedField, NeedMore};
use crate::ext::Protocol;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::fmt;

/// HTTP/2 Header
#[derive(Debug, Clone, Eq, PartialEq)]
pub enum Header<T = HeaderName> {
    Field { name: T, value: HeaderValue },
    // TODO: Change these types to `http::uri` types.
    Authority(BytesStr),
    Method(Method),
    Scheme(BytesStr),
    Path(BytesStr),
    Protocol(Protocol),
    Status(StatusCode),
}

/// The header field name
#[derive(Debug, Clone, Eq, PartialEq, Hash)]
pub enum Name<'a> {
    Field(&'a HeaderName),
    Authority,
    Method,
    Scheme,
    Path,
    Protocol,
    Status,
}

#[doc(hidden)]
#[derive(Clone, Eq, PartialEq, Default)]
pub struct BytesStr(Bytes);

pub fn len(name: &HeaderName, value: &HeaderValue) -> usize {
    let n: &str = name.as_ref();
    32 + n.len() + value.len()
}

impl Header<Option<HeaderName>> {
    #[cfg(any(test, fuzzing))] // grpcgate patch: only `Encoder::encode` uses it
    pub fn reify(self) -> Result<Header, HeaderValue> {
        use self::Header::*;

        Ok(match self {
            Field {
                name: Some(n),
                value,
            } => Field { name: n, value },
            Field { name: None, value } => return Err(value),
            Authority(v) => Authority(v),
            Method(v) => Method(v),
            Scheme(v) => Scheme(v),
            Path(v) => Path(v),
            Protocol(v) => Protocol(v),
            Status(v) => Status(v),
        })
    }
}

impl Header {
    /// grpcgate patch: a field HTTP/2 does not allow comes back whole, as a `MalformedField` (the
    /// checks borrow `name` and `value`), instead of as a bare error.
    pub fn new(name: Bytes, value: Bytes) -> Result<Header, MalformedField> {
        let res = if name.is_empty() {
            Err(DecoderError::NeedMore(NeedMore::UnexpectedEndOfStream))
        } else if name[0] == b':' {
            match &name[1..] {
                b"authority" | b"scheme" | b"path" | b"protocol" => {
                    match std::str::from_utf8(&value) {
                        Err(e) => Err(e.into()),
                        Ok(_) => {
                            let v = BytesStr(value);
                            return Ok(match name[1] {
                                b'a' => Header::Authority(v),
                                b's' => Header::Scheme(v),
                                b'p' if name.len() == 5 => Header::Path(v),
                                _ => Header::Protocol(
                                    Protocol::try_from(v.into_inner()).expect("checked UTF-8"),
                                ),
                            });
                        }
                    }
                }
                b"method" => Method::from_bytes(&value)
                    .map(Header::Method)
                    .map_err(Into::into),
                b"status" => StatusCode::from_bytes(&value)
                    .map(Header::Status)
                    .map_err(Into::into),
                _ => Err(DecoderError::InvalidPseudoheader),
            }
        } else {
            // HTTP/2 requires lower case header names
            HeaderName::from_lowercase(&name)
                .map_err(DecoderError::from)
                .and_then(|name| {
                    let value = HeaderValue::from_bytes(&value)?;
                    Ok(Header::Field { name, value })
                })
        };
        res.map_err(|error| MalformedField { name, value, error })
    }

    /// grpcgate patch: gRPC's usual header names and values, stored as static bytes.
    ///
    /// A decoded header is carved out of the connection's read buffer, so every later use of it
    /// from the dynamic table clones and drops a shared `Bytes`: two atomic read-modify-writes
    /// per field per call. A static one clones by copying a pointer. Only what goes into the
    /// dynamic table is interned, so this runs once per connection and header.
    pub fn interned(self) -> Header {
        match self {
            Header::Field { name, value } => {
                let value = match value.as_bytes() {
                    b"application/grpc" => HeaderValue::from_static("application/grpc"),
                    b"application/grpc+proto" => HeaderValue::from_static("application/grpc+proto"),
                    b"trailers" => HeaderValue::from_static("trailers"),
                    b"0" => HeaderValue::from_static("0"),
                    b"identity" => HeaderValue::from_static("identity"),
                    b"gzip" => HeaderValue::from_static("gzip"),
                    b"identity,deflate,gzip" => HeaderValue::from_static("identity,deflate,gzip"),
                    _ => value,
                };
                let name = match name.as_str() {
                    "grpc-status" => HeaderName::from_static("grpc-status"),
                    "grpc-message" => HeaderName::from_static("grpc-message"),
                    "grpc-encoding" => HeaderName::from_static("grpc-encoding"),
                    "grpc-accept-encoding" => HeaderName::from_static("grpc-accept-encoding"),
                    "grpc-timeout" => HeaderName::from_static("grpc-timeout"),
                    _ => name,
                };
                Header::Field { name, value }
            }
            Header::Scheme(v) => match v.as_str() {
                "http" => Header::Scheme(BytesStr::from_static("http")),
                "https" => Header::Scheme(BytesStr::from_static("https")),
                _ => Header::Scheme(v),
            },
            other => other,
        }
    }

    pub fn len(&self) -> usize {
        match *self {
            Header::Field {
                ref name,
                ref value,
            } => len(name, value),
            Header::Authority(ref v) => 32 + 10 + v.len(),
            Header::Method(ref v) => 32 + 7 + v.as_ref().len(),
            Header::Scheme(ref v) => 32 + 7 + v.len(),
            Header::Path(ref v) => 32 + 5 + v.len(),
            Header::Protocol(ref v) => 32 + 9 + v.as_str().len(),
            Header::Status(_) => 32 + 7 + 3,
        }
    }

    /// Returns the header name
    pub fn name(&self) -> Name<'_> {
        match *self {
            Header::Field { ref name, .. } => Name::Field(name),
            Header::Authority(..) => Name::Authority,
            Header::Method(..) => Name::Method,
            Header::Scheme(..) => Name::Scheme,
            Header::Path(..) => Name::Path,
            Header::Protocol(..) => Name::Protocol,
            Header::Status(..) => Name::Status,
        }
    }

    pub fn value_slice(&self) -> &[u8] {
        match *self {
            Header::Field { ref value, .. } => value.as_ref(),
            Header::Authority(ref v) => v.as_ref(),
            Header::Method(ref v) => v.as_ref().as_ref(),
            Header::Scheme(ref v) => v.as_ref(),
            Header::Path(ref v) => v.as_ref(),
            Header::Protocol(ref v) => v.as_ref(),
            Header::Status(ref v) => v.as_str().as_ref(),
        }
    }

    pub fn value_eq(&self, other: &Header) -> bool {
        match *self {
            Header::Field { ref value, .. } => {
                let a = value;
                match *other {
                    Header::Field { ref value, .. } => a == value,
                    _ => false,
                }
            }
            Header::Authority(ref a) => match *other {
                Header::Authority(ref b) => a == b,
                _ => false,
            },
            Header::Method(ref a) => match *other {
                Header::Method(ref b) => a == b,
                _ => false,
            },
            Header::Scheme(ref a) => match *other {
                Header::Scheme(ref b) => a == b,
                _ => false,
            },
            Header::Path(ref a) => match *other {
                Header::Path(ref b) => a == b,
                _ => false,
            },
            Header::Protocol(ref a) => match *other {
                Header::Protocol(ref b) => a == b,
                _ => false,
            },
            Header::Status(ref a) => match *other {
                Header::Status(ref b) => a == b,
                _ => false,
            },
        }
    }

    pub fn is_sensitive(&self) -> bool {
        match *self {
            Header::Field { ref value, .. } => value.is_sensitive(),
            // TODO: Technically these other header values can be sensitive too.
            _ => false,
        }
    }

    pub fn skip_value_index(&self) -> bool {
        self.name().skip_value_index()
    }
}

impl Name<'_> {
    /// Whether a header of this name is never put in the dynamic table. (grpcgate patch: moved
    /// here from `Header` so that the encoder can ask without an owned header.)
    pub fn skip_value_index(&self) -> bool {
        use http::header;

        match *self {
            Name::Field(name) => matches!(
                *name,
                header::AGE
                    | header::AUTHORIZATION
                    | header::CONTENT_LENGTH
                    | header::ETAG
                    | header::IF_MODIFIED_SINCE
                    | header::IF_NONE_MATCH
                    | header::LOCATION
                    | header::COOKIE
                    | header::SET_COOKIE
            ),
            // grpcgate patch: `:path` is indexed like any other header (upstream h2 never indexes
            // it). A gRPC path names a method, and a connection carries few of them, so after the
            // first call the path costs one byte instead of a Huffman-coded literal on both ends.
            // grpc-go (x/net hpack) and Netty index it too.
            _ => false,
        }
    }
}

// Mostly for tests
impl From<Header> for Header<Option<HeaderName>> {
    fn from(src: Header) -> Self {
        match src {
            Header::Field { name, value } => Header::Field {
                name: Some(name),
                value,
            },
            Header::Authority(v) => Header::Authority(v),
            Header::Method(v) => Header::Method(v),
            Header::Scheme(v) => Header::Scheme(v),
            Header::Path(v) => Header::Path(v),
            Header::Protocol(v) => Header::Protocol(v),
            Header::Status(v) => Header::Status(v),
        }
    }
}

impl<'a> Name<'a> {
    /// grpcgate patch: a value HTTP/2 does not allow comes back with the name, as a
    /// `MalformedField`.
    pub fn into_entry(self, value: Bytes) -> Result<Header, MalformedField> {
        let res = match self {
            Name::Field(name) => HeaderValue::from_bytes(&value)
                .map(|value| Header::Field {
                    name: name.clone(),
                    value,
                })
                .map_err(DecoderError::from),
            Name::Authority | Name::Scheme | Name::Path | Name::Protocol => {
                match std::str::from_utf8(&value) {
                    Err(e) => Err(e.into()),
                    Ok(_) => {
                        let v = BytesStr(value);
                        return Ok(match self {
                            Name::Authority => Header::Authority(v),
                            Name::Scheme => Header::Scheme(v),
                            Name::Path => Header::Path(v),
                            _ => Header::Protocol(
                                Protocol::try_from(v.into_inner()).expect("checked UTF-8"),
                            ),
                        });
                    }
                }
            }
            Name::Method => Method::from_bytes(&value)
                .map(Header::Method)
                .map_err(Into::into),
            // TODO: better error handling
            Name::Status => StatusCode::from_bytes(&value)
                .map(Header::Status)
                .map_err(|_| DecoderError::InvalidStatusCode),
        };
        res.map_err(|error| MalformedField {
            name: Bytes::copy_from_slice(self.as_slice()),
            value,
            error,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        match *self {
            Name::Field(ref name) => name.as_ref(),
            Name::Authority => b":authority",
            Name::Method => b":method",
            Name::Scheme => b":scheme",
            Name::Path => b":path",
            Name::Protocol => b":protocol",
            Name::Status => b":status",
        }
    }
}

// ===== impl BytesStr =====

impl BytesStr {
    pub(crate) const fn from_static(value: &'static str) -> Self {
        BytesStr(Bytes::from_static(value.as_bytes()))
    }

    pub(crate) fn from(value: &str) -> Self {
        BytesStr(Bytes::copy_from_slice(value.as_bytes()))
    }

    #[doc(hidden)]
    pub fn try_from(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(bytes.as_ref())?;
        Ok(BytesStr(bytes))
    }

    pub(crate) fn as_str(&self) -> &str {
        // Safety: check valid utf-8 in constructor
        unsafe { std::str::from_utf8_unchecked(self.0.as_ref()) }
    }

    pub(crate) fn into_inner(self) -> Bytes {
        self.0
    }
}

impl std::ops::Deref for BytesStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for BytesStr {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

impl fmt::Debug for BytesStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
