//! `#[cluster::main]`: what it accepts (compiled and run) and how it reports what it rejects.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
