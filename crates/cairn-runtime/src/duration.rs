use std::time::Duration;

/// Parses a duration flag such as `500ms`, `5s`, `2m`, `1h`, `1d`, `1m30s`, `1.5s`, or a plain
/// number meaning seconds (`30`). Meant for clap's `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {s:?}: use a number with a unit such as 500ms, 5s, 2m");
    let text = s.trim();
    if text.is_empty() {
        return Err(invalid());
    }
    if let Ok(secs) = text.parse::<f64>() {
        return to_duration(secs).ok_or_else(invalid);
    }

    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        let unit_len = rest[number_len..]
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len() - number_len);
        let number = &rest[..number_len];
        let unit = &rest[number_len..number_len + unit_len];
        rest = &rest[number_len + unit_len..];

        let value: f64 = number.parse().map_err(|_| invalid())?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3_600.0,
            "d" => 86_400.0,
            _ => return Err(invalid()),
        };
        let part = to_duration(value * scale).ok_or_else(invalid)?;
        total = total.checked_add(part).ok_or_else(invalid)?;
    }
    Ok(total)
}

fn to_duration(secs: f64) -> Option<Duration> {
    if secs.is_finite() && secs >= 0.0 { Duration::try_from_secs_f64(secs).ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units_and_plain_seconds() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3_600));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        assert_eq!(ok("30"), Duration::from_secs(30));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("1.5s"), Duration::from_millis(1_500));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok(" 10ms "), Duration::from_millis(10));
    }

    #[test]
    fn rejects_garbage_with_a_helpful_message() {
        for bad in ["", "s", "5x", "ms5", "-1s", "-3", "1..2s", "5 s", "inf", "NaN", "1e400"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.starts_with("invalid duration"), "{bad:?}: {err}");
            assert!(err.contains("500ms, 5s, 2m"), "{bad:?}: {err}");
        }
    }
}
