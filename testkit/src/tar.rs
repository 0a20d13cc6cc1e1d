//! A ustar archive builder for the image layers the shim's tests make.

/// A ustar archive of regular files (name, mode, bytes).
pub fn tar(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    tar_with_links(files, &[])
}

/// A ustar archive of regular files and then symlinks (name, target).
pub fn tar_with_links(files: &[(&str, u32, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut entries: Vec<(&str, u32, &[u8], Option<&str>)> =
        files.iter().map(|&(n, m, d)| (n, m, d, None)).collect();
    entries.extend(links.iter().map(|&(n, t)| (n, 0o777, &[][..], Some(t))));
    let mut out = Vec::new();
    for (name, mode, data, link) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |field: &mut [u8], value: u64| {
            let s = format!("{:0width$o}\0", value, width = field.len() - 1);
            field.copy_from_slice(s.as_bytes());
        };
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = b'0';
        if let Some(target) = link {
            h[156] = b'2';
            h[157..157 + target.len()].copy_from_slice(target.as_bytes());
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}
