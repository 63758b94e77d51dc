//! Where this process stands in a data-parallel job: its rank, the world size, its rank on the
//! node (which picks the GPU) and where the ranks meet, read from the environment the launcher
//! set. No flag says "distributed": a process that finds none of these variables trains alone.
//!
//! | launcher | rank | world | local rank | meeting point |
//! | --- | --- | --- | --- | --- |
//! | torchrun, or by hand | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` (0 if unset) | `MASTER_ADDR:MASTER_PORT` |
//! | Slurm (`srun`) | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` | first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`), port `MASTER_PORT` or [`slurm_port`] |
//! | Open MPI (`mpirun`) | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` | `MASTER_ADDR:MASTER_PORT` |
//! | MPICH, Intel MPI (PMI) | `PMI_RANK` | `PMI_SIZE` | `MPI_LOCALRANKID` or `PMI_LOCAL_RANK` | `MASTER_ADDR:MASTER_PORT` |
//!
//! The first launcher whose rank variable is set wins, in the order of the table: torchrun run
//! inside a Slurm allocation is torchrun's job. Slurm counts only inside a job step (`srun`
//! sets `SLURM_STEP_ID`): the batch script itself, which has `SLURM_PROCID` too, trains alone.

use anyhow::{bail, Context, Result};
use std::fmt;

/// The program that started the ranks, as read from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `RANK`/`WORLD_SIZE`: torchrun, or ranks started by hand.
    Torchrun,
    Slurm,
    OpenMpi,
    Pmi,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun (RANK/WORLD_SIZE)",
            Launcher::Slurm => "Slurm (SLURM_PROCID/SLURM_NTASKS)",
            Launcher::OpenMpi => "Open MPI (OMPI_COMM_WORLD_*)",
            Launcher::Pmi => "PMI (PMI_RANK/PMI_SIZE)",
        })
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub launcher: Launcher,
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this node: the GPU this process uses.
    pub local_rank: usize,
    /// Where rank 0 listens for the others (host, port).
    pub master: (String, u16),
    /// torchrun's agent already serves its own store on `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`); the ranks then meet on [`Place::meeting_port`].
    pub agent_store: bool,
}

impl Place {
    /// Rank `rank` of `world` processes on this machine meeting at `127.0.0.1:port`, as ranks
    /// started by hand with `MASTER_ADDR=127.0.0.1` are.
    pub fn local(rank: usize, world: usize, port: u16) -> Place {
        Place {
            launcher: Launcher::Torchrun,
            rank,
            world,
            local_rank: rank,
            master: ("127.0.0.1".into(), port),
            agent_store: false,
        }
    }

    /// The port rank 0 listens on: `MASTER_PORT`, or the port after it when torchrun's agent
    /// holds `MASTER_PORT` (listening there would fail with "address in use").
    pub fn meeting_port(&self) -> Result<u16> {
        if !self.agent_store {
            return Ok(self.master.1);
        }
        self.master.1.checked_add(1).with_context(|| {
            format!(
                "MASTER_PORT={} is held by torchrun's agent and the ranks meet on the next \
                 port, but there is none; choose a lower --master-port",
                self.master.1
            )
        })
    }
}

/// The Slurm meeting port when `MASTER_PORT` is not set: derived from the job id, so that two
/// jobs sharing a node do not collide, in 20000–39999 (clear of the usual ephemeral range).
pub fn slurm_port(job_id: u64) -> u16 {
    (20_000 + job_id % 20_000) as u16
}

/// The place this process's environment gives it, through `var` (the process environment in
/// the program, a table in tests). `None`: no launcher variables, or a job of one process;
/// either way the process trains alone.
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Place>> {
    let launchers = [
        (Launcher::Torchrun, "RANK", "WORLD_SIZE", &["LOCAL_RANK"][..]),
        (Launcher::Slurm, "SLURM_PROCID", "SLURM_NTASKS", &["SLURM_LOCALID"][..]),
        (
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            &["OMPI_COMM_WORLD_LOCAL_RANK"][..],
        ),
        (Launcher::Pmi, "PMI_RANK", "PMI_SIZE", &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"][..]),
    ];
    let Some(&(launcher, rank_var, world_var, local_vars)) =
        launchers.iter().find(|(l, rank, ..)| {
            var(rank).is_some() && (*l != Launcher::Slurm || var("SLURM_STEP_ID").is_some())
        })
    else {
        return Ok(None);
    };
    let number = |name: &str| -> Result<Option<usize>> {
        let Some(v) = var(name) else { return Ok(None) };
        v.trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{name}={v:?} (set by {launcher}) is not a whole number"))
    };
    let rank = number(rank_var)?.expect("the launcher was chosen by its rank variable");
    let world = number(world_var)?.with_context(|| {
        format!("{rank_var} is set but {world_var} is not: {launcher} sets both")
    })?;
    if world == 0 || rank >= world {
        bail!("{rank_var}={rank} with {world_var}={world}: the rank must be below the world size");
    }
    let mut local_rank = 0;
    for name in local_vars {
        if let Some(v) = number(name)? {
            local_rank = v;
            break;
        }
    }
    if world == 1 {
        return Ok(None);
    }
    let master = match launcher {
        Launcher::Slurm => slurm_master(&var)?,
        _ => master_from(&var, launcher)?,
    };
    let agent_store = launcher == Launcher::Torchrun
        && var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    Ok(Some(Place { launcher, rank, world, local_rank, master, agent_store }))
}

fn port(var: &impl Fn(&str) -> Option<String>) -> Result<Option<u16>> {
    let Some(v) = var("MASTER_PORT") else { return Ok(None) };
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => bail!("MASTER_PORT={v:?} is not a TCP port (1-65535)"),
    }
}

fn master_from(var: &impl Fn(&str) -> Option<String>, launcher: Launcher) -> Result<(String, u16)> {
    let addr = var("MASTER_ADDR").filter(|a| !a.trim().is_empty());
    match (addr, port(var)?) {
        (Some(a), Some(p)) => Ok((a.trim().to_string(), p)),
        _ => bail!(
            "{launcher} started several ranks but MASTER_ADDR and MASTER_PORT are not both set: \
             export them to rank 0's host and a free port (e.g. MASTER_ADDR=node01 \
             MASTER_PORT=29500) so the ranks can meet"
        ),
    }
}

fn slurm_master(var: &impl Fn(&str) -> Option<String>) -> Result<(String, u16)> {
    let addr = match var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
        Some(a) => a.trim().to_string(),
        None => {
            let (name, list) = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .iter()
                .find_map(|n| var(n).map(|v| (*n, v)))
                .context("Slurm started several ranks but sets no node list (SLURM_STEP_NODELIST or SLURM_JOB_NODELIST) and MASTER_ADDR is not set: export MASTER_ADDR")?;
            first_host(&list).with_context(|| format!("{name}={list:?}: no host name in it"))?
        }
    };
    let port = match port(var)? {
        Some(p) => p,
        None => {
            let id = var("SLURM_JOB_ID").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            slurm_port(id)
        }
    };
    Ok((addr, port))
}

/// The first host of a Slurm host list: `node[07-09,12],gpu1` → `node07`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match entry.find('[') {
        None => entry.to_string(),
        Some(open) => {
            let close = entry[open..].find(']')? + open;
            let first = entry[open + 1..close].split([',', '-']).next()?;
            format!("{}{}{}", &entry[..open], first, &entry[close + 1..])
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn no_launcher_or_one_rank_trains_alone() {
        assert_eq!(from_env(env(&[])).unwrap(), None);
        assert_eq!(from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(), None);
        // An sbatch script has SLURM_PROCID but is no job step.
        let batch = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "7")]);
        assert_eq!(from_env(batch).unwrap(), None);
    }

    #[test]
    fn torchrun_sets_rank_world_local_rank_and_master() {
        let p = from_env(env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            // Slurm's variables are there too when torchrun runs in an allocation.
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            Place {
                launcher: Launcher::Torchrun,
                rank: 5,
                world: 8,
                local_rank: 1,
                master: ("10.0.0.2".into(), 29500),
                agent_store: true,
            }
        );
        assert_eq!(p.meeting_port().unwrap(), 29501);
        let by_hand = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        let p = from_env(by_hand).unwrap().unwrap();
        assert_eq!((p.local_rank, p.agent_store, p.meeting_port().unwrap()), (0, false, 29500));
    }

    #[test]
    fn slurm_takes_the_first_host_and_a_port_from_the_job() {
        let p = from_env(env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NODELIST", "gpu-a[07-09,12],gpu-b3"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((p.launcher, p.rank, p.world, p.local_rank), (Launcher::Slurm, 9, 16, 1));
        assert_eq!(p.master, ("gpu-a07".to_string(), slurm_port(123456)));
        assert_eq!(slurm_port(123456), 23456);
        assert_eq!(first_host("node1,node2").as_deref(), Some("node1"));
        assert_eq!(first_host("n[3]x").as_deref(), Some("n3x"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn mpi_launchers_read_their_own_variables() {
        let master = [("MASTER_ADDR", "head"), ("MASTER_PORT", "4000")];
        let mut ompi = vec![
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
        ];
        ompi.extend(master);
        let p = from_env(env(&ompi)).unwrap().unwrap();
        assert_eq!((p.launcher, p.rank, p.world, p.local_rank), (Launcher::OpenMpi, 3, 4, 3));
        assert_eq!(p.master, ("head".to_string(), 4000));
        let mut pmi = vec![("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "0")];
        pmi.extend(master);
        let p = from_env(env(&pmi)).unwrap().unwrap();
        assert_eq!((p.launcher, p.rank, p.world, p.local_rank), (Launcher::Pmi, 2, 3, 0));
    }

    #[test]
    fn bad_environments_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (&[("RANK", "0")], "WORLD_SIZE is not"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "below the world size"),
            (&[("RANK", "0"), ("WORLD_SIZE", "2")], "MASTER_ADDR and MASTER_PORT"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "0")],
                "MASTER_PORT=\"0\"",
            ),
            (&[("PMI_RANK", "0"), ("PMI_SIZE", "2")], "PMI (PMI_RANK/PMI_SIZE) started"),
            (
                &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", "1")],
                "no node list",
            ),
        ];
        for (vars, want) in cases {
            let err = format!("{:#}", from_env(env(vars)).unwrap_err());
            assert!(err.contains(want), "{vars:?}: {err:?} does not say {want:?}");
        }
    }
}
