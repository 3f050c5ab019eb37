//! What batchd never prints: the userinfo and query values of a URL (NATS
//! and provider URLs may carry a password, a token or an API key), and any
//! configured secret that turns up inside a message from elsewhere.

/// `url` (or a comma-separated list of URLs, as NATS accepts) with its
/// userinfo replaced by `***` and every query value by `***`; a fragment is
/// dropped. Text that is not a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| redact_one(part.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let tail = tail.split('#').next().unwrap_or_default();
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) => format!("{k}=***"),
                    None => pair.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&");
            format!("{path}?{query}")
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{host}{tail}")
}

/// `url` (or a comma-separated list) without userinfo: the credentials go
/// to the client separately, so a library that logs its server address at
/// debug level never logs them.
pub fn strip_userinfo(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            let (scheme, rest) = part.split_at(part.find("://").map_or(0, |i| i + 3));
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}{}", &rest[at + 1..]),
                None => part.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The userinfo of a URL, percent-decoded: `(user, Some(password))`, or
/// `(token, None)` when there is no `:`.
pub fn userinfo(url: &str) -> Option<(String, Option<String>)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let (info, _) = authority.rsplit_once('@')?;
    Some(match info.split_once(':') {
        Some((user, password)) => (percent_decode(user), Some(percent_decode(password))),
        None => (percent_decode(info), None),
    })
}

/// The secret parts of a URL: its userinfo (user and password, decoded and
/// not) and its query values; what [`Scrubber`] must never let through.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in url.split(',') {
        let rest = part.split_once("://").map_or(part, |(_, r)| r);
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            for s in authority[..at].split(':') {
                out.push(s.to_owned());
            }
        }
        if let Some((_, query)) = rest.split_once('?') {
            let query = query.split('#').next().unwrap_or_default();
            for pair in query.split('&') {
                if let Some((_, v)) = pair.split_once('=') {
                    out.push(v.to_owned());
                }
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|s| percent_decode(s)).collect();
    out.extend(decoded);
    out
}

/// `%XX` sequences decoded (invalid ones kept as they are).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces known secrets in text that came from elsewhere (a provider's
/// error message may repeat the key it was sent).
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    /// A scrubber for these secrets (those shorter than 4 characters are
    /// too common to replace and are left out).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Scrubber {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        // Longest first, so a secret that contains another goes whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrubber { secrets }
    }

    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_query_values_are_redacted() {
        assert_eq!(
            redact_url("nats://batchd:s3cret@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(
            redact_url("nats://tok3n@a:4222, tls://u:p@b:4222"),
            "nats://***@a:4222,tls://***@b:4222"
        );
        assert_eq!(
            redact_url("https://u:p@api.example.com/v1?key=abc&x=1#frag"),
            "https://***@api.example.com/v1?key=***&x=***"
        );
        assert_eq!(
            redact_url("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
        assert_eq!(redact_url("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(
            strip_userinfo("nats://u:p@a:4222,tls://t@b:4222"),
            "nats://a:4222,tls://b:4222"
        );
        assert_eq!(
            userinfo("nats://us%40er:p%3Ass@a:4222"),
            Some(("us@er".into(), Some("p:ss".into())))
        );
        assert_eq!(userinfo("nats://tok@a"), Some(("tok".into(), None)));
    }

    #[test]
    fn url_secrets_and_scrubbing() {
        let s = url_secrets("https://us%65r:p%40ss@h/v1?key=k3y-value");
        for want in ["us%65r", "user", "p%40ss", "p@ss", "k3y-value"] {
            assert!(s.contains(&want.to_owned()), "{want} in {s:?}");
        }
        let scrubber = Scrubber::new(["sk-canary-1234".to_owned(), "ab".to_owned()]);
        assert_eq!(
            scrubber.scrub("Incorrect API key provided: sk-canary-1234 (ab)"),
            "Incorrect API key provided: *** (ab)"
        );
    }
}
