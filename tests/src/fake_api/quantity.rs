//! Kubernetes quantities as the API server stores them: parsed, then written back in
//! canonical form (k8s.io/apimachinery/pkg/api/resource/quantity.go `CanonicalizeBytes`),
//! so `1048576Ki` is read back as `1Gi` and `1000m` as `1`.
//!
//! Values are held as integer nano-units; a valid quantity outside that range (or finer
//! than a nano-unit) is kept as written.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    BinarySi,
    DecimalSi,
    DecimalExponent,
}

const NANO: i128 = 1_000_000_000;

/// The canonical form of `s`, or `None` when it is not a quantity (the server rejects it).
pub(crate) fn canonical(s: &str) -> Option<String> {
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let (format, scale) = parse_suffix(suffix)?;
    Some(
        to_nanos(int, frac, scale)
            .map_or_else(|| s.to_owned(), |v| format_nanos(v, negative, format)),
    )
}

enum Scale {
    Binary(u32),
    Decimal(i32),
}

fn parse_suffix(suffix: &str) -> Option<(Format, Scale)> {
    let binary = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if let Some(k) = binary.iter().skip(1).position(|b| *b == suffix) {
        return Some((Format::BinarySi, Scale::Binary(k as u32 + 1)));
    }
    let decimal = [
        ("n", -9),
        ("u", -6),
        ("m", -3),
        ("", 0),
        ("k", 3),
        ("M", 6),
        ("G", 9),
        ("T", 12),
        ("P", 15),
        ("E", 18),
    ];
    if let Some((_, e)) = decimal.iter().find(|(d, _)| *d == suffix) {
        return Some((Format::DecimalSi, Scale::Decimal(*e)));
    }
    let exp = suffix.strip_prefix(['e', 'E'])?;
    let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // An absurd exponent is still a valid quantity; it just falls outside our range.
    let e = exp.parse::<i32>().unwrap_or(i32::MAX);
    Some((Format::DecimalExponent, Scale::Decimal(e)))
}

fn to_nanos(int: &str, frac: &str, scale: Scale) -> Option<i128> {
    let digits = format!("{int}{frac}");
    let mut value: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    // value * 10^-len(frac) * scale, in units of 10^-9.
    let mut exp10: i64 = 9 - frac.len() as i64;
    match scale {
        Scale::Binary(k) => value = value.checked_mul(1024i128.checked_pow(k)?)?,
        Scale::Decimal(e) => exp10 += i64::from(e),
    }
    if exp10 >= 0 {
        value.checked_mul(10i128.checked_pow(u32::try_from(exp10).ok()?)?)
    } else {
        let div = 10i128.checked_pow(u32::try_from(-exp10).ok()?)?;
        (value % div == 0).then(|| value / div)
    }
}

fn format_nanos(v: i128, negative: bool, format: Format) -> String {
    if v == 0 {
        return "0".into();
    }
    let sign = if negative { "-" } else { "" };
    if format == Format::BinarySi && v >= 1024 * NANO && v % NANO == 0 {
        let mut bytes = v / NANO;
        let mut k = 0;
        while k < 6 && bytes % 1024 == 0 {
            bytes /= 1024;
            k += 1;
        }
        let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][k];
        return format!("{sign}{bytes}{suffix}");
    }
    // Largest exponent of 1000 (from 10^-9 up to 10^18) that divides the value exactly.
    let mut e = -9;
    let mut m = v;
    while e < 18 && m % 1000 == 0 {
        m /= 1000;
        e += 3;
    }
    if format == Format::DecimalExponent {
        return if e == 0 {
            format!("{sign}{m}")
        } else {
            format!("{sign}{m}e{e}")
        };
    }
    let suffix = match e {
        -9 => "n",
        -6 => "u",
        -3 => "m",
        0 => "",
        3 => "k",
        6 => "M",
        9 => "G",
        12 => "T",
        15 => "P",
        _ => "E",
    };
    format!("{sign}{m}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn canonical_forms_match_apimachinery() {
        for (input, want) in [
            ("1048576Ki", "1Gi"),
            ("24684096Ki", "24684096Ki"),
            ("1Ki", "1Ki"),
            ("1536", "1536"),
            ("2000", "2k"),
            ("1000m", "1"),
            ("0.5", "500m"),
            ("2", "2"),
            ("100Mi", "100Mi"),
            ("512Ki", "512Ki"),
            ("0", "0"),
            ("0Gi", "0"),
            ("1e3", "1e3"),
            ("1000e0", "1e3"),
            ("-1Gi", "-1Gi"),
            ("0.5Ki", "512"),
        ] {
            assert_eq!(canonical(input).as_deref(), Some(want), "{input}");
        }
    }

    #[test]
    fn rejects_what_the_server_rejects() {
        for bad in ["", "Ki", "1KiB", "1.2.3", "abc", "1 Gi", "1e", "--1"] {
            assert_eq!(canonical(bad), None, "{bad:?}");
        }
    }
}
