//! A file-mode token file: one `<token> <value>` per line (blank lines and
//! `#` comments ignored), where the value says what the token proves (a node,
//! a workload). The parsing and the constant-time lookup shared by the
//! per-node bootstrap tokens and the workload tokens.

use super::auth::constant_time_eq;

/// Why a line of a token file was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not `<token> <value>`, a token that cannot travel in a header, or a
    /// value `parse_value` refused.
    Bad { line: usize, reason: String },
    /// The token was already given on line `first` (the token itself is not
    /// repeated in the error).
    Duplicate { line: usize, first: usize },
}

/// The tokens of one file and what each proves.
pub struct TokenTable<T> {
    entries: Vec<(Vec<u8>, T)>,
}

impl<T> TokenTable<T> {
    /// Parses `text`; `form` names the value in errors (`<node>`), and
    /// `parse_value` checks it.
    pub fn parse(text: &str, form: &str, parse_value: impl Fn(&str) -> Result<T, String>) -> Result<Self, LineError> {
        let mut entries: Vec<(Vec<u8>, T)> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| LineError::Bad { line: line_no, reason };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [token, value] = fields.as_slice() else {
                return Err(bad(format!("want `<token> {form}`, found {} fields", fields.len())));
            };
            // split_whitespace leaves no whitespace; what is left must travel in a header.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("the token holds characters not allowed in a header".to_owned()));
            }
            let value = parse_value(value).map_err(bad)?;
            if let Some(first) = entries.iter().position(|(t, _)| t == token.as_bytes()) {
                return Err(LineError::Duplicate { line: line_no, first: lines_of[first] });
            }
            entries.push((token.as_bytes().to_vec(), value));
            lines_of.push(line_no);
        }
        Ok(TokenTable { entries })
    }

    /// What `token` proves. Every entry is compared in constant time, so the
    /// time taken says nothing about how close a guess came.
    pub fn lookup(&self, token: &[u8]) -> Option<&T> {
        let mut found = None;
        for (t, value) in &self.entries {
            if constant_time_eq(token, t) && found.is_none() {
                found = Some(value);
            }
        }
        found
    }

    /// How many tokens the file gives.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it gives none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(v: &str) -> Result<String, String> {
        v.bytes()
            .all(|b| b.is_ascii_lowercase())
            .then(|| v.to_uppercase())
            .ok_or_else(|| format!("{v:?} is not lowercase"))
    }

    #[test]
    fn lines_give_tokens_and_their_values_comments_and_blanks_skipped() {
        let t = TokenTable::parse("# c\n\n  tok-a  alpha \ntok-b beta\n", "<name>", upper).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(b"tok-a").map(String::as_str), Some("ALPHA"));
        assert_eq!(t.lookup(b"tok-b").map(String::as_str), Some("BETA"));
        assert_eq!(t.lookup(b"tok-"), None);
        assert!(TokenTable::parse("# only a comment\n", "<name>", upper).unwrap().is_empty());
    }

    #[test]
    fn bad_lines_and_duplicate_tokens_are_refused_with_their_line() {
        let err = |text| TokenTable::parse(text, "<name>", upper).err().unwrap();
        assert!(matches!(err("a\n"), LineError::Bad { line: 1, reason } if reason.contains("<token> <name>")));
        assert!(matches!(err("\na b c\n"), LineError::Bad { line: 2, .. }));
        assert!(matches!(err("tök a\n"), LineError::Bad { reason, .. } if reason.contains("header")));
        assert!(matches!(err("t A\n"), LineError::Bad { reason, .. } if reason.contains("not lowercase")));
        assert_eq!(err("t a\n# x\nu b\nt c\n"), LineError::Duplicate { line: 4, first: 1 });
    }
}
