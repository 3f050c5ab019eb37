//! The `batchd run` binary as a child process, for tests that kill it.

use std::process::{Child, Command, Stdio};

/// The `batchd run` binary, killed on drop.
pub struct Batchd(Child);

impl Batchd {
    pub fn start(config: &std::path::Path) -> Batchd {
        let child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start batchd");
        Batchd(child)
    }

    /// SIGTERM, then waits for the exit: a graceful shutdown.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.0.wait().expect("reap")
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Batchd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
