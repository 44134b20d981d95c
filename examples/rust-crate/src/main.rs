//! `digits N...`: prints each number with thousands separators.

fn main() {
    for arg in std::env::args().skip(1) {
        match arg.parse::<u64>() {
            Ok(n) => println!("{}", digits::grouped(n)),
            Err(err) => {
                eprintln!("digits: {arg:?} is not a number from 0 to {}: {err}", u64::MAX);
                std::process::exit(2);
            }
        }
    }
}
