//! Hash routes. The page is static, so every view lives after `#` and permalinks work on any
//! host without server rewrites: `#/` lists the loaded images, `#/neuron/<layer>/<index>` shows
//! one MLP neuron, `#/search/<query>` the neurons that match a concept (the query
//! percent-encoded).

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The image list (`#/`, `#` or no hash at all).
    Home,
    /// Neuron `index` of the MLP in block `layer` (both counted from 0).
    Neuron { layer: usize, index: usize },
    /// A `#/neuron/...` address whose layer or index is not a whole number, with the hash.
    InvalidNeuron(String),
    /// Neurons matching a concept, with the decoded query.
    Search(String),
    /// Any other hash, which it contains.
    Unknown(String),
}

impl Route {
    /// Parses `location.hash` (with or without the leading `#`).
    pub fn parse(hash: &str) -> Route {
        let path = hash.strip_prefix('#').unwrap_or(hash);
        let path = path.strip_prefix('/').unwrap_or(path);
        let path = path.strip_suffix('/').unwrap_or(path);
        if path.is_empty() {
            return Route::Home;
        }

        if path == "search" {
            return Route::Search(String::new());
        }
        if let Some(query) = path.strip_prefix("search/") {
            return Route::Search(decode_component(query));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["neuron", layer, index] => match (parse_count(layer), parse_count(index)) {
                (Some(layer), Some(index)) => Route::Neuron { layer, index },
                _ => Route::InvalidNeuron(hash.to_string()),
            },
            ["neuron", ..] => Route::InvalidNeuron(hash.to_string()),
            _ => Route::Unknown(hash.to_string()),
        }
    }
}

/// Parses a decimal count of at most nine digits, so that no address can name an index that
/// overflows when it is multiplied by a row width.
fn parse_count(text: &str) -> Option<usize> {
    if text.is_empty() || text.len() > 9 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Decodes percent-encoding; malformed escapes and invalid UTF-8 are kept as they are, so any
/// address gives some query.
pub fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// Percent-encodes everything but ASCII letters, digits and `-._~`.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Returns the link to the search for `query`.
pub fn search_href(query: &str) -> String {
    format!("#/search/{}", encode_component(query))
}

/// Returns the link to a neuron's page.
pub fn neuron_href(layer: usize, index: usize) -> String {
    format!("#/neuron/{layer}/{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_round_trip() {
        for query in ["dog", "hot dog", "café", "a/b%c#d", "狗", "🐕", ""] {
            assert_eq!(Route::parse(&search_href(query)), Route::Search(query.to_string()), "{query:?}");
        }
        assert_eq!(Route::parse("#/search/%zz%4"), Route::Search("%zz%4".into()));
        assert_eq!(Route::parse("#/search/%FF"), Route::Search("%FF".into()));
    }

    #[test]
    fn empty_hashes_are_home() {
        for hash in ["", "#", "#/", "/"] {
            assert_eq!(Route::parse(hash), Route::Home, "hash {hash:?}");
        }
    }

    #[test]
    fn neuron_route_parses() {
        assert_eq!(Route::parse("#/neuron/9/1234"), Route::Neuron { layer: 9, index: 1234 });
        assert_eq!(Route::parse("#/neuron/0/0/"), Route::Neuron { layer: 0, index: 0 });
        assert_eq!(Route::parse(&neuron_href(10, 7)), Route::Neuron { layer: 10, index: 7 });
    }

    #[test]
    fn malformed_neuron_routes_are_invalid() {
        for hash in [
            "#/neuron/99/abc",
            "#/neuron/9",
            "#/neuron/9/1/2",
            "#/neuron/-1/3",
            "#/neuron/+1/3",
            "#/neuron/1.5/3",
            "#/neuron//3",
            "#/neuron/99999999999999999999999/1",
            "#/neuron/9/%31",
        ] {
            assert_eq!(Route::parse(hash), Route::InvalidNeuron(hash.to_string()), "hash {hash:?}");
        }
    }

    #[test]
    fn other_hashes_are_unknown() {
        assert_eq!(Route::parse("#/search/ship"), Route::Unknown("#/search/ship".into()));
        assert_eq!(Route::parse("#top"), Route::Unknown("#top".into()));
    }
}
