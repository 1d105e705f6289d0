//! Exists so that `agent` can name this crate as a build dependency (cargo then rebuilds the
//! agent when the eBPF sources change); the programs are the `hotplug-probes` binary.
#![no_std]
