//! OpenAI `stop` strings over streamed text: the text up to the first stop string is emitted,
//! the stop string and everything after it are not. While the tail of the text could still
//! grow into a stop string it is held back, so no client ever sees part of one.

pub struct StopFilter {
    stops: Vec<String>,
    /// Text received but not yet emitted (a possible start of a stop string).
    held: String,
}

/// What one push lets through.
#[derive(Debug, PartialEq, Eq)]
pub struct Pass {
    pub text: String,
    /// A stop string was found: generation should end.
    pub stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Pass {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Pass {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .filter(|&n| self.held.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Pass {
            text,
            stopped: false,
        }
    }

    /// Generation ended without a stop string: what was held back is plain text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let pass = f.push(p);
            out.push_str(&pass.text);
            if pass.stopped {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D and more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn a_near_miss_is_released() {
        assert_eq!(run(&["END"], &["EN", "d"]), ("ENd".into(), false));
        assert_eq!(run(&["END"], &["abc EN"]), ("abc EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn held_text_is_emitted_as_soon_as_it_cannot_start_a_stop() {
        let mut f = StopFilter::new(vec!["\n\n".into()]);
        assert_eq!(f.push("a\n").text, "a");
        assert_eq!(f.push("b").text, "\nb");
    }

    #[test]
    fn multibyte_stops() {
        assert_eq!(run(&["é!"], &["caf", "é", "!x"]), ("caf".into(), true));
        assert_eq!(run(&[], &["plain"]), ("plain".into(), false));
    }
}
