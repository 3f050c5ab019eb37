//! Prompt caching as OpenAI does it: a prompt of at least 1024 tokens whose
//! beginning was sent recently gets that shared prefix billed as
//! `cached_tokens`, in steps of 128 tokens.
//!
//! The prompt text is cut into blocks of 128 tokens (512 characters) and each
//! block's hash is chained to the previous one, so a block hash stands for the
//! whole prefix up to it. The cache keeps only those hashes, in two
//! generations: entries live between one and two generations after their last
//! use, and memory never exceeds two generations' worth of hashes.
//!
//! A provider writes its cache while it reads the prompt, so a prefix is
//! found only from the moment the request that brought it has been read
//! (its prefill done): requests that arrive together with one new shared
//! prefix all miss, as they do at OpenAI. Each hash keeps the instant it
//! becomes visible.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::hash::Fnv64;

/// Prompts shorter than this are never cached.
pub(crate) const MIN_CACHED_TOKENS: u64 = 1024;

/// Cached prefixes grow in steps of this many tokens.
pub(crate) const BLOCK_TOKENS: u64 = 128;

/// Characters per block, at the simulator's four characters a token.
const BLOCK_CHARS: usize = 512;

/// The hashes of every whole block of `text`, each covering the prefix up to
/// its block. Keyed by model, as OpenAI's cache is.
pub(crate) fn prefix_hashes(model: &str, text: &str) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(text.len() / BLOCK_CHARS);
    let mut state = Fnv64::new().write(model.as_bytes()).write(&[0xff]).finish();
    let mut block_start = 0;
    let mut chars_in_block = 0;
    for (at, _) in text.char_indices() {
        if chars_in_block == BLOCK_CHARS {
            state = Fnv64::resume(state)
                .write(&text.as_bytes()[block_start..at])
                .finish();
            hashes.push(state);
            block_start = at;
            chars_in_block = 0;
        }
        chars_in_block += 1;
    }
    if chars_in_block == BLOCK_CHARS {
        state = Fnv64::resume(state)
            .write(&text.as_bytes()[block_start..])
            .finish();
        hashes.push(state);
    }
    hashes
}

/// Recently seen prompt prefixes, bounded in size and age.
#[derive(Debug)]
pub(crate) struct PromptCache {
    /// Block hash → the instant from which a request can find it.
    current: HashMap<u64, Instant>,
    previous: HashMap<u64, Instant>,
    generation_started: Instant,
    generation_capacity: usize,
    generation_age: Duration,
}

impl PromptCache {
    /// OpenAI keeps a prefix for 5 to 10 minutes after its last use; so do we.
    pub(crate) const DEFAULT_GENERATION_AGE: Duration = Duration::from_secs(5 * 60);

    /// 64K block hashes a generation: about 8M distinct prompt tokens, ~2 MiB.
    pub(crate) const DEFAULT_GENERATION_CAPACITY: usize = 64 * 1024;

    pub(crate) fn new(generation_capacity: usize, generation_age: Duration, now: Instant) -> Self {
        PromptCache {
            current: HashMap::new(),
            previous: HashMap::new(),
            generation_started: now,
            generation_capacity: generation_capacity.max(1),
            generation_age,
        }
    }

    /// The cached tokens at `now` of a prompt with these block hashes and
    /// token count; its prefixes become visible to later requests from
    /// `written_at` on (when its prefill is done).
    pub(crate) fn lookup_and_insert(
        &mut self,
        now: Instant,
        written_at: Instant,
        prefixes: &[u64],
        prompt_tokens: u64,
    ) -> u64 {
        if prompt_tokens < MIN_CACHED_TOKENS || prefixes.is_empty() {
            return 0;
        }
        self.expire(now);
        let matched = prefixes
            .iter()
            .take_while(|hash| self.visible_from(**hash).is_some_and(|at| at <= now))
            .count() as u64;

        // A prompt longer than a whole generation keeps only its beginning.
        let kept = prefixes.len().min(self.generation_capacity);
        if self.current.len() + kept > self.generation_capacity {
            self.rotate(now);
        }
        for &hash in &prefixes[..kept] {
            // Written already, or about to be by an earlier request: the
            // earlier instant holds.
            let at = self
                .visible_from(hash)
                .map_or(written_at, |at| at.min(written_at));
            self.current.insert(hash, at);
        }

        let cached = matched * BLOCK_TOKENS;
        if cached < MIN_CACHED_TOKENS {
            return 0;
        }
        // Blocks are cut by characters and tokens counted per message, so cap
        // the two estimates against each other.
        cached.min(prompt_tokens / BLOCK_TOKENS * BLOCK_TOKENS)
    }

    /// When `hash` became (or becomes) visible, if it is cached.
    fn visible_from(&self, hash: u64) -> Option<Instant> {
        self.current
            .get(&hash)
            .or_else(|| self.previous.get(&hash))
            .copied()
    }

    fn expire(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.generation_started);
        if age >= self.generation_age * 2 {
            self.current.clear();
            self.previous.clear();
            self.generation_started = now;
        } else if age >= self.generation_age {
            self.rotate(now);
        }
    }

    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.generation_started = now;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of `blocks` whole blocks, distinct per `seed`.
    fn text(seed: char, blocks: usize) -> String {
        std::iter::repeat_n(seed, blocks * BLOCK_CHARS).collect()
    }

    fn cache(now: Instant) -> PromptCache {
        PromptCache::new(1000, Duration::from_secs(300), now)
    }

    #[test]
    fn hashes_one_per_whole_block_and_shared_prefixes_share_hashes() {
        assert!(prefix_hashes("m", &text('a', 1)[1..]).is_empty());
        let long = prefix_hashes("m", &text('a', 10));
        assert_eq!(long.len(), 10);
        let longer = prefix_hashes("m", &(text('a', 10) + &text('b', 3)));
        assert_eq!(&longer[..10], &long[..]);
        assert_ne!(
            prefix_hashes("other", &text('a', 10)),
            long,
            "keyed by model"
        );
    }

    #[test]
    fn multibyte_text_is_cut_by_characters() {
        assert_eq!(prefix_hashes("m", &text('é', 2)).len(), 2);
    }

    #[test]
    fn repeated_long_prompt_is_cached_in_steps_of_128() {
        let now = Instant::now();
        let mut cache = cache(now);
        let prompt = prefix_hashes("m", &text('a', 10));
        assert_eq!(
            cache.lookup_and_insert(now, now, &prompt, 1300),
            0,
            "first sight"
        );
        assert_eq!(cache.lookup_and_insert(now, now, &prompt, 1300), 1280);
        // Same prefix, new ending: only the shared blocks count.
        let extended = prefix_hashes("m", &(text('a', 9) + &text('z', 4)));
        assert_eq!(cache.lookup_and_insert(now, now, &extended, 1700), 9 * 128);
    }

    #[test]
    fn a_prefix_is_found_only_once_its_first_request_is_read() {
        let start = Instant::now();
        let mut cache = cache(start);
        let prompt = prefix_hashes("m", &text('a', 10));
        let read = start + Duration::from_millis(400);
        assert_eq!(cache.lookup_and_insert(start, read, &prompt, 1300), 0);
        let meanwhile = start + Duration::from_millis(100);
        assert_eq!(
            cache.lookup_and_insert(
                meanwhile,
                meanwhile + Duration::from_millis(400),
                &prompt,
                1300
            ),
            0,
            "still being read"
        );
        assert_eq!(
            cache.lookup_and_insert(read, read, &prompt, 1300),
            1280,
            "the first request's write holds, not the later one's"
        );
    }

    #[test]
    fn short_prompts_and_short_shared_prefixes_are_not_cached() {
        let now = Instant::now();
        let mut cache = cache(now);
        let short = prefix_hashes("m", &text('a', 7));
        cache.lookup_and_insert(now, now, &short, 900);
        assert_eq!(
            cache.lookup_and_insert(now, now, &short, 900),
            0,
            "under 1024 tokens"
        );
        let long = prefix_hashes("m", &(text('a', 7) + &text('b', 5)));
        cache.lookup_and_insert(now, now, &long, 1600);
        let diverging = prefix_hashes("m", &(text('a', 7) + &text('c', 5)));
        assert_eq!(
            cache.lookup_and_insert(now, now, &diverging, 1600),
            0,
            "shared 896 < 1024"
        );
    }

    #[test]
    fn cached_tokens_never_exceed_the_prompt() {
        let now = Instant::now();
        let mut cache = cache(now);
        let prompt = prefix_hashes("m", &text('a', 10));
        cache.lookup_and_insert(now, now, &prompt, 1100);
        assert_eq!(cache.lookup_and_insert(now, now, &prompt, 1100), 1024);
    }

    #[test]
    fn unused_prefixes_expire_after_two_generations() {
        let start = Instant::now();
        let mut cache = cache(start);
        let prompt = prefix_hashes("m", &text('a', 10));
        cache.lookup_and_insert(start, start, &prompt, 1300);
        let later = start + Duration::from_secs(301);
        assert_eq!(
            cache.lookup_and_insert(later, later, &prompt, 1300),
            1280,
            "previous generation"
        );
        let much_later = later + Duration::from_secs(600);
        assert_eq!(
            cache.lookup_and_insert(much_later, much_later, &prompt, 1300),
            0
        );
    }

    #[test]
    fn memory_is_bounded_by_two_generations() {
        let now = Instant::now();
        let mut cache = cache(now);
        for seed in 0..500u32 {
            let seed = char::from_u32(0x4e00 + seed).unwrap();
            let prompt = prefix_hashes("m", &text(seed, 10));
            cache.lookup_and_insert(now, now, &prompt, 1300);
        }
        assert!(cache.len() <= 2000, "{} entries", cache.len());
    }
}
