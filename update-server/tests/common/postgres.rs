//! A private PostgreSQL for tests: on a free port, as the `postgres` user when we are root,
//! stopped on drop.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::{free_port, wait_for};

/// A running PostgreSQL; `url` connects as the `postgres` superuser.
pub struct Postgres {
    _dir: tempfile::TempDir,
    child: Child,
    pub url: String,
}

fn pg_binary(name: &str) -> std::path::PathBuf {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/local/bin".into());
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<_> = rd.flatten().map(|e| e.path().join("bin")).collect();
        v.sort();
        dirs.extend(v.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("PostgreSQL's {name} not found (Debian package postgresql)"))
}

fn postgres_ids() -> Option<(u32, u32)> {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a postgres user")
    };
    Some((id("-u"), id("-g")))
}

impl Postgres {
    pub async fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let ids = postgres_ids();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("pgdata");
        let mut initdb = Command::new(pg_binary("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let port = free_port();
        let mut server = Command::new(pg_binary("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = ids {
            initdb.uid(uid).gid(gid);
            server.uid(uid).gid(gid);
        }
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child = server.spawn().unwrap();
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let u = url.clone();
        wait_for(60, "PostgreSQL to accept connections", || {
            let u = u.clone();
            async move { update_server::store::Store::open(&u).await.ok().map(|_| ()) }
        })
        .await;
        Postgres {
            _dir: dir,
            child,
            url,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
