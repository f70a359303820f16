//! Bundle encoding and verification, one test per way a bundle can be wrong.

use proptest::prelude::*;
use stitch_format::*;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

fn trusted(keys: &[&SecretKey]) -> TrustedKeys {
    let mut t = TrustedKeys::new();
    for k in keys {
        t.insert(k.public());
    }
    t
}

fn sample_patch() -> Patch {
    Patch {
        id: "ST-2026-0001".into(),
        revision: 3,
        title: "Bounds check in parse_header".into(),
        description: "Rejects a length larger than the buffer.".into(),
        cves: vec!["CVE-2026-12345".into()],
        severity: Severity::High,
        tier: Tier::Free,
        author: "Stitch Security <security@stitch.example>".into(),
        target: Target {
            module: "libdemo.so.1".into(),
            sha256: [7; 32],
            size: 16384,
            build_id: Some(vec![0xab; 20]),
            arch: Arch::X86_64,
            package: Package {
                ecosystem: Ecosystem::Deb,
                name: "libdemo1".into(),
                version: "1.0-1".into(),
            },
        },
        imports: vec![Import {
            name: "abort".into(),
            module: "libc.so.6".into(),
            symbol: "abort".into(),
        }],
        patchlets: vec![Patchlet {
            name: "check-len".into(),
            at: 0x1139,
            original: vec![0x55, 0x48, 0x89, 0xe5, 0x90],
            displaced: Displaced::Before,
            resume: 0x113e,
            code: vec![0xf0, 0x48, 0xff, 0x05, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0],
            relocs: vec![
                Reloc {
                    offset: 4,
                    kind: RelocKind::Pc32,
                    target: RelocTarget::HitCounter,
                    addend: -4,
                },
                Reloc {
                    offset: 9,
                    kind: RelocKind::Pc32,
                    target: RelocTarget::Import(0),
                    addend: -4,
                },
            ],
            source: "stitch_hit\ncall abort\n".into(),
        }],
    }
}

fn signed(keys: &[&SecretKey]) -> Vec<u8> {
    let mut b = Bundle::new(sample_patch()).unwrap();
    for k in keys {
        b.sign(*k).unwrap();
    }
    b.encode()
}

fn code_of(r: Result<impl std::fmt::Debug, FormatError>) -> &'static str {
    r.expect_err("must be rejected").code()
}

#[test]
fn valid_signature_by_trusted_key_verifies() {
    let k = key(1);
    let v = Bundle::decode_verified(&signed(&[&k]), &trusted(&[&k])).unwrap();
    assert_eq!(v.patch(), &sample_patch());
    assert_eq!(v.signed_by(), &[k.public().key_id()]);
}

#[test]
fn unsigned_bundle_is_rejected_missing_signature() {
    let k = key(1);
    assert_eq!(
        code_of(Bundle::decode_verified(&signed(&[]), &trusted(&[&k]))),
        "bundle.missing_signature"
    );
}

#[test]
fn bad_signature_tampered_body_is_rejected() {
    let k = key(1);
    let mut bytes = signed(&[&k]);
    // Flip one byte of the title inside the body: still decodes, signature no longer matches.
    let pos = bytes
        .windows(6)
        .position(|w| w == b"Bounds")
        .expect("title in body");
    bytes[pos] = b'b';
    assert_eq!(
        code_of(Bundle::decode_verified(&bytes, &trusted(&[&k]))),
        "bundle.bad_signature"
    );
}

#[test]
fn bad_signature_flipped_signature_bit_is_rejected() {
    let k = key(1);
    let mut bytes = signed(&[&k]);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_eq!(
        code_of(Bundle::decode_verified(&bytes, &trusted(&[&k]))),
        "bundle.bad_signature"
    );
}

#[test]
fn wrong_key_signature_is_rejected_untrusted() {
    let author = key(1);
    let attacker = key(2);
    assert_eq!(
        code_of(Bundle::decode_verified(
            &signed(&[&attacker]),
            &trusted(&[&author])
        )),
        "bundle.untrusted_key"
    );
}

#[test]
fn forged_signature_under_trusted_key_id_is_rejected() {
    // An attacker signs with their key but labels the signature with the trusted key's id.
    let author = key(1);
    let attacker = key(2);
    let mut b = Bundle::new(sample_patch()).unwrap();
    b.sign(&attacker).unwrap();
    b.signatures[0].key_id = author.public().key_id();
    assert_eq!(
        code_of(Bundle::decode_verified(&b.encode(), &trusted(&[&author]))),
        "bundle.bad_signature"
    );
}

#[test]
fn one_bad_trusted_signature_beside_a_good_one_is_rejected() {
    let a = key(1);
    let b_key = key(2);
    let mut b = Bundle::new(sample_patch()).unwrap();
    b.sign(&a).unwrap();
    b.sign(&b_key).unwrap();
    b.signatures[1].signature[0] ^= 0x80;
    assert_eq!(
        code_of(Bundle::decode_verified(
            &b.encode(),
            &trusted(&[&a, &b_key])
        )),
        "bundle.bad_signature"
    );
}

#[test]
fn several_signatures_with_one_unknown_key_verify() {
    let a = key(1);
    let other = key(9);
    let v = Bundle::decode_verified(&signed(&[&other, &a]), &trusted(&[&a])).unwrap();
    assert_eq!(v.signed_by(), &[a.public().key_id()]);
}

#[test]
fn duplicate_signature_by_one_key_is_rejected() {
    let a = key(1);
    let mut b = Bundle::new(sample_patch()).unwrap();
    b.sign(&a).unwrap();
    assert_eq!(b.sign(&a).unwrap_err().code(), "bundle.duplicate_signature");
    b.signatures.push(b.signatures[0].clone());
    assert_eq!(
        code_of(Bundle::decode(&b.encode())),
        "bundle.duplicate_signature"
    );
}

#[test]
fn truncated_bundle_is_rejected_at_every_length() {
    let k = key(1);
    let bytes = signed(&[&k]);
    for len in 0..bytes.len() {
        let code = code_of(Bundle::decode(&bytes[..len]));
        assert!(
            code == "bundle.truncated" || code == "bundle.bad_magic",
            "len {len}: {code}"
        );
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = signed(&[&key(1)]);
    bytes.push(0);
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.trailing_bytes");
}

#[test]
fn oversize_input_is_rejected_before_parsing() {
    let bytes = vec![0u8; limits::MAX_BUNDLE_BYTES + 1];
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.oversize");
}

#[test]
fn huge_length_prefix_is_rejected_without_allocating() {
    let mut bytes = signed(&[]);
    // The id's length prefix sits right after the 14-byte header.
    bytes[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.limit_exceeded");
}

#[test]
fn bad_magic_is_rejected() {
    let mut bytes = signed(&[]);
    bytes[0] = b'X';
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.bad_magic");
}

#[test]
fn unknown_format_version_is_rejected() {
    let mut bytes = signed(&[]);
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.unknown_version");
}

#[test]
fn unknown_enum_tag_is_rejected_malformed() {
    let mut p = sample_patch();
    p.severity = Severity::Critical;
    let bytes = Bundle::new(p).unwrap().encode();
    // The severity tag is the only 0x03 directly after the CVE list; find it structurally.
    let body = &bytes[14..];
    let cve_end = body
        .windows(14)
        .position(|w| w == b"CVE-2026-12345")
        .unwrap()
        + 14;
    let mut bad = bytes.clone();
    bad[14 + cve_end] = 9;
    assert_eq!(code_of(Bundle::decode(&bad)), "bundle.malformed");
}

#[test]
fn non_utf8_text_is_rejected_malformed() {
    let mut bytes = signed(&[]);
    let pos = bytes.windows(6).position(|w| w == b"Bounds").unwrap();
    bytes[pos] = 0xff;
    assert_eq!(code_of(Bundle::decode(&bytes)), "bundle.malformed");
}

#[test]
fn malformed_fields_are_rejected_by_validation() {
    type Mutation = fn(&mut Patch);
    let cases: &[(&str, Mutation)] = &[
        ("bad id", |p| p.id = "patch 1".into()),
        ("revision 0", |p| p.revision = 0),
        ("bad cve", |p| p.cves = vec!["CVE-26-1".into()]),
        ("module with slash", |p| {
            p.target.module = "../etc/passwd".into()
        }),
        ("empty title", |p| p.title.clear()),
        ("original too short", |p| {
            p.patchlets[0].original.truncate(4)
        }),
        ("reloc past code end", |p| {
            p.patchlets[0].relocs[1].offset = 10
        }),
        ("import index out of range", |p| {
            p.patchlets[0].relocs[1].target = RelocTarget::Import(5)
        }),
        ("no patchlets", |p| p.patchlets.clear()),
        ("overlapping patchlets", |p| {
            let mut q = p.patchlets[0].clone();
            q.name = "second".into();
            q.at += 2;
            p.patchlets.push(q);
        }),
        ("duplicate patchlet name", |p| {
            let mut q = p.patchlets[0].clone();
            q.at += 0x100;
            p.patchlets.push(q);
        }),
        ("control char in title", |p| p.title = "a\u{1b}[31mb".into()),
    ];
    for (what, mutate) in cases {
        let mut p = sample_patch();
        mutate(&mut p);
        let err = Bundle::new(p.clone()).expect_err(what);
        assert_eq!(err.code(), "bundle.malformed", "{what}: {err}");
        // The decoder applies the same rules to bytes built without validation.
        let raw = Bundle {
            patch: p,
            signatures: vec![],
        }
        .encode();
        assert_eq!(code_of(Bundle::decode(&raw)), "bundle.malformed", "{what}");
    }
}

#[test]
fn key_lines_round_trip_and_typos_are_rejected() {
    let k = key(3);
    let back = SecretKey::from_line(&k.to_line()).unwrap();
    assert_eq!(back.public(), k.public());
    let pubk = PublicKey::from_line(&format!("{} release key", k.public().to_line())).unwrap();
    assert_eq!(pubk, k.public());
    assert_eq!(
        PublicKey::from_line("stitch-ed25519-public-v1:abcd")
            .unwrap_err()
            .code(),
        "key.malformed"
    );
    let text = format!("# vendor keys\n{}\nnot-a-key\n", k.public().to_line());
    assert_eq!(
        TrustedKeys::from_text(&text).unwrap_err().code(),
        "key.malformed"
    );
}

#[test]
fn signature_covers_domain_and_version_not_just_body() {
    let k = key(1);
    let b = Bundle::new(sample_patch()).unwrap();
    let msg = b.signed_message();
    assert!(msg.starts_with(SIGNATURE_DOMAIN));
    let plain = k.sign(&sample_patch().encode()).unwrap();
    let mut forged = b.clone();
    forged.signatures.push(Signature {
        key_id: k.public().key_id(),
        signature: plain,
    });
    assert_eq!(
        code_of(Bundle::decode_verified(&forged.encode(), &trusted(&[&k]))),
        "bundle.bad_signature"
    );
}

fn arb_patch() -> impl Strategy<Value = Patch> {
    (
        1u32..1000,
        "[A-Za-z ]{1,40}",
        ".{0,200}",
        proptest::collection::vec(1000u32..99999, 0..4),
        0usize..4,
        proptest::collection::vec(any::<u8>(), 5..32),
        proptest::collection::vec(any::<u8>(), 13..200),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 1..40)),
        0usize..3,
        any::<i32>(),
    )
        .prop_map(
            |(revision, title, description, cves, sev, original, code, build_id, disp, addend)| {
                let mut p = sample_patch();
                p.revision = revision;
                p.title = title;
                p.description = description;
                p.cves = cves.iter().map(|n| format!("CVE-2025-{n:04}")).collect();
                p.severity = Severity::ALL[sev];
                p.target.build_id = build_id;
                let pl = &mut p.patchlets[0];
                pl.original = original;
                pl.code = code;
                pl.displaced = Displaced::ALL[disp];
                pl.relocs[0].addend = addend as i64;
                p
            },
        )
}

proptest! {
    #[test]
    fn encoding_round_trips_and_is_canonical(p in arb_patch(), nkeys in 0usize..3) {
        let keys: Vec<SecretKey> = (0..nkeys).map(|i| key(i as u8 + 1)).collect();
        let mut b = Bundle::new(p).unwrap();
        for k in &keys { b.sign(k).unwrap(); }
        let bytes = b.encode();
        let back = Bundle::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &b);
        prop_assert_eq!(back.encode(), bytes);
        if nkeys > 0 {
            let t = trusted(&keys.iter().collect::<Vec<_>>());
            prop_assert!(back.verify(&t).is_ok());
        }
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Bundle::decode(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_mutated_bundles(pos in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = signed(&[&key(1)]);
        let i = pos % bytes.len();
        bytes[i] = byte;
        let _ = Bundle::decode_verified(&bytes, &trusted(&[&key(1)]));
    }
}

#[test]
fn pypi_names_differing_only_in_case_or_separators_are_one_package() {
    // A patch for Pillow names `pillow`; an inventory reporting `Pillow` or `zope_interface`
    // would make it never relevant on the dashboard.
    use stitch_format::normalize_pypi_name;
    assert_eq!(normalize_pypi_name("Pillow"), "pillow");
    assert_eq!(normalize_pypi_name("zope.interface"), "zope-interface");
    assert_eq!(
        normalize_pypi_name("typing__Extensions"),
        "typing-extensions"
    );
    assert_eq!(normalize_pypi_name("ujson"), "ujson");
}
