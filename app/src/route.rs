//! Hash routes. The page is static, so every view lives after `#` and permalinks work on any
//! host without server rewrites: `#/` lists the loaded images, `#/neuron/<layer>/<index>` shows
//! one MLP neuron.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The image list (`#/`, `#` or no hash at all).
    Home,
    /// Neuron `index` of the MLP in block `layer` (both counted from 0).
    Neuron { layer: usize, index: usize },
    /// A `#/neuron/...` address whose layer or index is not a whole number, with the hash.
    InvalidNeuron(String),
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

/// Returns the link to a neuron's page.
pub fn neuron_href(layer: usize, index: usize) -> String {
    format!("#/neuron/{layer}/{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
