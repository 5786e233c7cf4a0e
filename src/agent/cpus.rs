//! Keeping a packet on the CPU where it entered: the kernel mechanisms behind the per-CPU
//! data path ([`super::workers`]).
//!
//! # Why
//! A userspace tunnel adds at least two hand-offs per direction: the application's packet
//! wakes the agent, the agent's datagram wakes the peer's agent (and the same on the way
//! back). Waking a thread on the CPU that is already running costs a context switch (about
//! a microsecond); waking it on another CPU that sits idle costs an inter-processor
//! interrupt and that CPU's exit from its idle state, which on virtual machines and deep
//! C-states is tens to hundreds of microseconds, far more than the agent's own work (sealing
//! a ping is a few microseconds). So the agent runs one data-path thread per CPU, each
//! pinned to its CPU, and asks the kernel to hand every packet to the thread of the CPU it
//! was produced on:
//!
//! * **TUN**: a multi-queue device (one queue per CPU, plus one for the control loop) and a
//!   steering program ([`attach_cpu_steering`]): two instructions of eBPF that return the
//!   current CPU, so a packet an application sends on CPU 3 lands in queue 3;
//! * **UDP**: one socket per CPU bound to the same port ([`bind_group`]), each marked with
//!   `SO_INCOMING_CPU`; the kernel's socket lookup prefers the socket whose CPU matches the
//!   one processing the datagram.
//!
//! Where a mechanism is missing (no permission to load the program, an old kernel, a single
//! CPU, a cpuset with holes), the agent runs one data-path thread, the control loop.
//!
//! A bulk flow wants the opposite of a ping; see [`Steering`] for how the data path funnels
//! it to one unpinned thread and spreads again after.
//!
//! # Keeping the port ours
//! The sockets are bound with `SO_REUSEPORT` (which the kernel grants only to the same user)
//! and the option is cleared on every one of them once all are bound: from then on, like a
//! plain socket, the port refuses any further bind ("address in use"), so a second agent
//! configured with the same port still fails at start instead of sharing our traffic. The
//! kernel keeps preferring the socket whose `SO_INCOMING_CPU` matches.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// The environment variable that turns the per-CPU data path on (`1`, `true`, `on`, `yes`)
/// or off (`0`, `false`, `off`, `no`) whatever the config says.
pub(crate) const PER_CPU_ENV: &str = "MESHVPN_PER_CPU";

/// Whether to run the per-CPU data path: the environment's word if it says one of the
/// words of [`PER_CPU_ENV`], else the config's.
pub(crate) fn wanted(config: bool, env: Option<&str>) -> bool {
    match env.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Some("1" | "true" | "on" | "yes") => true,
        Some("0" | "false" | "off" | "no") => false,
        Some(_) | None => config,
    }
}

/// The most data-path threads an agent runs: beyond a handful of cores one member's traffic
/// (one WireGuard session per peer, all under one lock) gains nothing from more threads, and
/// each costs its receive buffers.
pub(crate) const MAX_WORKERS: usize = 8;

/// The CPUs this process may run on, when they are exactly `0..n` with `n ≥ 2` (capped at
/// [`MAX_WORKERS`]): the CPUs that get a data-path thread. `None` on one CPU, or when the
/// allowed set has holes (a cpuset), where queue numbers could not simply be CPU numbers.
pub(crate) fn data_path_cpus() -> Option<usize> {
    let allowed = allowed_cpus().ok()?;
    let n = allowed.len();
    if n < 2 || allowed.iter().enumerate().any(|(i, &cpu)| cpu != i) {
        return None;
    }
    Some(n.min(MAX_WORKERS))
}

/// The CPUs this process may run on, ascending.
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond what an affinity mask holds"),
        ));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; `cpu` is below its capacity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TUNSETSTEERINGEBPF`: `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
/// `bpf(2)` command and program type (uapi `linux/bpf.h`).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `BPF_FUNC_get_smp_processor_id`: the helper returning the current CPU.
const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;

/// One eBPF instruction (uapi `struct bpf_insn`; both registers in `regs`, low nibble dst).
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `prog_flags`; the kernel takes a
/// shorter attribute and treats the rest as zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// What the steering program returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    /// The current CPU modulo this many queues.
    Cpu(usize),
    /// Always this queue.
    Queue(usize),
}

/// The steering program: `return current CPU % cpus`, or `return queue`. The kernel then
/// takes the result modulo the number of queues; with `cpus` below it, queue `i` gets exactly
/// the packets sent on CPU `i` and the queues past `cpus` (the control loop's) get none.
fn program(p: Program) -> Vec<BpfInsn> {
    let insn = |code: u8, imm: i32| BpfInsn {
        code,
        regs: 0,
        off: 0,
        imm,
    };
    // BPF_ALU64 | BPF_MOV | BPF_K, BPF_JMP | BPF_CALL, BPF_ALU64 | BPF_MOD | BPF_K,
    // BPF_JMP | BPF_EXIT; every instruction works on r0.
    const MOV: u8 = 0xb7;
    const CALL: u8 = 0x85;
    const MOD: u8 = 0x97;
    const EXIT: u8 = 0x95;
    match p {
        Program::Cpu(cpus) => vec![
            insn(CALL, BPF_FUNC_GET_SMP_PROCESSOR_ID),
            insn(MOD, i32::try_from(cpus.max(1)).unwrap_or(i32::MAX)),
            insn(EXIT, 0),
        ],
        Program::Queue(queue) => vec![insn(MOV, i32::try_from(queue).unwrap_or(0)), insn(EXIT, 0)],
    }
}

/// Loads the steering program for `cpus` CPUs; the kernel checks it before accepting it.
fn load_steering_program(p: Program) -> io::Result<OwnedFd> {
    let insns = program(p);
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size given; the instruction
    // array and the license string outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes the multi-queue TUN device behind `queue` hand every packet to the queue numbered
/// like the CPU that sent it (modulo `cpus`). Needs `CAP_BPF` (or root) to load the program.
pub(crate) fn attach_cpu_steering(queue: &impl AsRawFd, cpus: usize) -> io::Result<()> {
    attach(queue, Program::Cpu(cpus))
}

fn attach(queue: &impl AsRawFd, p: Program) -> io::Result<()> {
    let prog = load_steering_program(p)?;
    let prog_fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program's descriptor) from the pointer;
    // the device keeps its own reference to the program, so ours may close after.
    let r = unsafe { libc::ioctl(queue.as_raw_fd(), TUNSETSTEERINGEBPF, &prog_fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// UDP sockets sharing one port: the first is the control loop's, then one per CPU.
pub(crate) struct SocketGroup {
    /// Whether the sockets are `[::]` ones that also carry IPv4.
    pub(crate) dual_stack: bool,
    /// The control loop's socket (no CPU preference).
    pub(crate) main: std::net::UdpSocket,
    /// Socket `i` is preferred for datagrams the kernel processes on CPU `i`.
    pub(crate) per_cpu: Vec<std::net::UdpSocket>,
}

/// Binds `1 + cpus` non-blocking UDP sockets to `port` (0: one the kernel picks), `[::]`
/// dual-stack where the host has IPv6 and `0.0.0.0` otherwise; see the module docs for how
/// the port stays exclusive. With `cpus == 0` this is one plain socket.
pub(crate) fn bind_group(port: u16, cpus: usize) -> io::Result<SocketGroup> {
    bind_group_in(port, cpus, true)
}

/// [`bind_group`], IPv4-only unless `try_ipv6`.
///
/// The order of binds matters for [`Steering::funnel`]: among sockets equally good for a
/// datagram the kernel takes the first of its list, to whose end it adds dual-stack sockets
/// bound with `SO_REUSEPORT` and to whose front it adds IPv4 ones. So the control loop's
/// socket is bound first when dual-stack and last when IPv4-only.
fn bind_group_in(port: u16, cpus: usize, try_ipv6: bool) -> io::Result<SocketGroup> {
    let reuse = cpus > 0;
    let (first, dual_stack) = if try_ipv6 {
        bind_one(port, None, reuse)?
    } else {
        (bind_one_family(port, false, None, reuse)?, false)
    };
    let port = first.local_addr()?.as_socket().map_or(port, |a| a.port());
    let main_first = dual_stack || cpus == 0;
    let (mut main, mut per_cpu) = if main_first {
        (Some(first), Vec::with_capacity(cpus))
    } else {
        set_incoming_cpu(&first, 0)?;
        (None, vec![first])
    };
    let mut result = Ok(());
    for cpu in per_cpu.len()..cpus {
        match bind_one_family(port, dual_stack, Some(cpu), true) {
            Ok(s) => per_cpu.push(s),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if main.is_none() && result.is_ok() {
        match bind_one_family(port, dual_stack, None, true) {
            Ok(s) => main = Some(s),
            Err(e) => result = Err(e),
        }
    }
    // Whatever happened, no other socket may join the port from now on.
    for s in main.iter().chain(&per_cpu) {
        s.set_reuse_port(false)?;
    }
    result?;
    let main = main.ok_or_else(|| io::Error::other("the control loop's socket was not bound"))?;
    Ok(SocketGroup {
        dual_stack,
        main: main.into(),
        per_cpu: per_cpu.into_iter().map(Into::into).collect(),
    })
}

/// The first socket: `[::]` dual-stack if the host has IPv6, else `0.0.0.0`.
fn bind_one(port: u16, cpu: Option<usize>, reuse: bool) -> io::Result<(Socket, bool)> {
    match bind_one_family(port, true, cpu, reuse) {
        Ok(s) => Ok((s, true)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        // No IPv6 on this host: IPv4 only.
        Err(_) => bind_one_family(port, false, cpu, reuse).map(|s| (s, false)),
    }
}

fn bind_one_family(
    port: u16,
    dual_stack: bool,
    cpu: Option<usize>,
    reuse: bool,
) -> io::Result<Socket> {
    let (domain, addr) = if dual_stack {
        (
            Domain::IPV6,
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
        )
    } else {
        (
            Domain::IPV4,
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        )
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if dual_stack {
        s.set_only_v6(false)?;
    }
    s.set_nonblocking(true)?;
    if reuse {
        s.set_reuse_port(true)?;
    }
    if let Some(cpu) = cpu {
        set_incoming_cpu(&s, cpu)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// A descriptor of its own for what `fd` refers to.
fn dup_fd(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup only reads the descriptor number, which `fd` keeps open for the call.
    let dup = unsafe { libc::dup(fd.as_raw_fd()) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// `SO_INCOMING_CPU`: prefer this socket for datagrams processed on `cpu`.
fn set_incoming_cpu(s: &impl AsRawFd, cpu: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(cpu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "CPU number out of range"))?;
    set_incoming_cpu_raw(s, value)
}

/// `SO_INCOMING_CPU` with any value (-1: no CPU; the kernel then sets it to the CPU of the
/// next datagram the socket receives).
fn set_incoming_cpu_raw(s: &impl AsRawFd, value: libc::c_int) -> io::Result<()> {
    // SAFETY: SO_INCOMING_CPU takes one int; the pointer and length describe `value`.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where the kernel hands packets: to the thread of the CPU they were produced on (the
/// per-CPU threads' queues and sockets), or all to the control loop.
///
/// # Why two modes
/// Keeping every hand-off on one CPU is what makes a sparse exchange (a ping, a request and
/// its answer) fast. A bulk flow wants the opposite: the program producing it on one CPU and
/// the agent sealing it on another, in parallel; kept on the producer's CPU the two take
/// turns and the flow runs at half speed. So the data path starts spread by CPU, and the
/// first batch large enough to mean a bulk flow ([`BUSY_BATCH`]) funnels everything to the
/// control loop — one unpinned thread, which the scheduler places beside the producer, as
/// when there are no per-CPU threads. After [`FUNNEL_HOLD`] without such a batch it spreads
/// again. Either way every packet is read by some thread: a switch only moves where the
/// kernel queues the next ones.
///
/// Funnelled datagrams reach the control loop's socket because the per-CPU sockets give up
/// their CPU preference (`SO_INCOMING_CPU` of -1) and the control loop's socket, bound
/// first, comes first among equals in the kernel's lookup.
pub(crate) struct Steering {
    /// A descriptor of one queue of the TUN device (the program is per device).
    tun: Option<OwnedFd>,
    /// The per-CPU sockets, socket `i` for CPU `i`.
    sockets: Vec<OwnedFd>,
    funnelled: bool,
}

/// The fewest packets one read must bring to mean a bulk flow: a TCP sender's super-packet
/// from the TUN is dozens of segments, a GRO-coalesced read from the socket likewise; a ping,
/// a DNS query or an interactive session never comes close.
pub(crate) const BUSY_BATCH: usize = 16;
/// How long the data path stays funnelled after the last bulk batch: long enough that a
/// flow pausing between bursts (TCP slow start, an application's writes) does not flip the
/// steering back and forth, short enough that the next interactive exchange is fast again.
pub(crate) const FUNNEL_HOLD: Duration = Duration::from_millis(500);

impl Steering {
    /// Steering over a queue of the TUN device `tun` whose CPU program is attached (none:
    /// the UDP half alone) and the per-CPU `sockets`, socket `i` for CPU `i`; holds descriptors
    /// of its own for both.
    pub(crate) fn new(
        tun: Option<&impl AsRawFd>,
        sockets: &[std::net::UdpSocket],
    ) -> io::Result<Self> {
        Ok(Self {
            tun: tun.map(dup_fd).transpose()?,
            sockets: sockets
                .iter()
                .map(|s| s.try_clone().map(OwnedFd::from))
                .collect::<io::Result<_>>()?,
            funnelled: false,
        })
    }

    /// Whether everything goes to the control loop now.
    pub(crate) fn is_funnelled(&self) -> bool {
        self.funnelled
    }

    /// Hands every new packet to the control loop (queue and socket number `cpus`).
    pub(crate) fn funnel(&mut self) -> io::Result<()> {
        if self.funnelled {
            return Ok(());
        }
        self.funnelled = true;
        for s in &self.sockets {
            set_incoming_cpu_raw(s, -1)?;
        }
        match &self.tun {
            Some(tun) => attach(tun, Program::Queue(self.sockets.len())),
            None => Ok(()),
        }
    }

    /// Hands every new packet to the thread of the CPU it was produced on.
    pub(crate) fn spread(&mut self) -> io::Result<()> {
        if !self.funnelled {
            return Ok(());
        }
        self.funnelled = false;
        for (cpu, s) in self.sockets.iter().enumerate() {
            set_incoming_cpu(s, cpu)?;
        }
        match &self.tun {
            Some(tun) => attach(tun, Program::Cpu(self.sockets.len())),
            None => Ok(()),
        }
    }
}

/// [`Steering`] driven by batch sizes, shared by the threads: any thread's bulk batch
/// funnels, the control loop spreads again after [`FUNNEL_HOLD`] of quiet.
pub(crate) struct Funnel {
    steering: Mutex<Steering>,
    /// Whether `steering` funnels (read without its lock on every batch).
    funnelled: AtomicBool,
    /// The last bulk batch, in nanoseconds after `epoch`.
    last_busy: AtomicU64,
    epoch: Instant,
}

impl Funnel {
    /// Starts spread.
    pub(crate) fn new(steering: Steering) -> Self {
        Self {
            funnelled: AtomicBool::new(steering.is_funnelled()),
            steering: Mutex::new(steering),
            last_busy: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Notes one read of `packets` packets at `now`; true if this one funnelled.
    pub(crate) fn note_batch(&self, packets: usize, now: Instant) -> bool {
        if packets < BUSY_BATCH {
            return false;
        }
        let since = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos());
        self.last_busy
            .fetch_max(since.unwrap_or(u64::MAX), Ordering::AcqRel);
        if self.funnelled.load(Ordering::Acquire) {
            return false;
        }
        let mut steering = self.steering.lock().unwrap_or_else(|e| e.into_inner());
        if steering.is_funnelled() {
            return false;
        }
        if let Err(e) = steering.funnel() {
            tracing::warn!(%e, "could not funnel the data path to the control loop");
        }
        self.funnelled.store(true, Ordering::Release);
        true
    }

    /// While funnelled, when to spread again: [`FUNNEL_HOLD`] after the last bulk batch.
    pub(crate) fn spread_at(&self) -> Option<Instant> {
        self.funnelled.load(Ordering::Acquire).then(|| {
            self.epoch + Duration::from_nanos(self.last_busy.load(Ordering::Acquire)) + FUNNEL_HOLD
        })
    }

    /// Spreads again if funnelled and [`FUNNEL_HOLD`] passed since the last bulk batch;
    /// true if it did.
    pub(crate) fn maybe_spread(&self, now: Instant) -> bool {
        if self.spread_at().is_none_or(|at| now < at) {
            return false;
        }
        let mut steering = self.steering.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = steering.spread() {
            tracing::warn!(%e, "could not hand the data path back to the per-CPU threads");
        }
        self.funnelled.store(false, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_config_only_with_a_clear_word() {
        assert!(!wanted(false, None));
        assert!(wanted(true, None));
        assert!(wanted(false, Some(" ON ")));
        assert!(!wanted(true, Some("0")));
        assert!(
            wanted(true, Some("maybe")),
            "an unclear word leaves the config's choice"
        );
    }

    #[test]
    fn the_steering_program_is_call_mod_exit() {
        let shape = |p: Program| {
            program(p)
                .iter()
                .map(|i| (i.code, i.imm))
                .collect::<Vec<_>>()
        };
        assert_eq!(shape(Program::Cpu(4)), [(0x85, 8), (0x97, 4), (0x95, 0)]);
        assert_eq!(shape(Program::Queue(2)), [(0xb7, 2), (0x95, 0)]);
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8, "uapi struct bpf_insn");
        assert_eq!(
            program(Program::Cpu(0))[1].imm,
            1,
            "never a modulus of zero"
        );
    }

    #[test]
    fn a_group_keeps_its_port_exclusive() {
        let group = bind_group(0, 2).expect("binding a group on a free port");
        let port = group.main.local_addr().expect("bound").port();
        assert_eq!(group.per_cpu.len(), 2);
        for s in &group.per_cpu {
            assert_eq!(s.local_addr().expect("bound").port(), port);
        }
        for reuse in [false, true] {
            let err = bind_one(port, None, reuse).err();
            assert_eq!(
                err.map(|e| e.kind()),
                Some(io::ErrorKind::AddrInUse),
                "a later bind (SO_REUSEPORT {reuse}) must find the port taken"
            );
        }
        let err = bind_group(port, 2).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::AddrInUse), "a second agent");
    }

    /// What the five datagrams sent from each of `cpus` CPUs should be counted as: per CPU,
    /// all five in slot `slot(cpu)` of `cpus + 1` (a socket or a queue).
    fn five_each(cpus: usize, slot: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
        (0..cpus)
            .map(|cpu| {
                let mut counts = vec![0usize; cpus + 1];
                counts[slot(cpu)] = 5;
                counts
            })
            .collect()
    }

    /// Sends five datagrams to `port` on loopback from each CPU in turn; returns, per CPU,
    /// how many each socket of `group` (main first) read.
    fn received_per_cpu(group: &SocketGroup, port: u16, cpus: usize) -> Vec<Vec<usize>> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let to: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, port).into();
                    let mut seen = Vec::new();
                    for cpu in 0..cpus {
                        pin_current_thread(cpu).expect("pinning the sender");
                        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
                        for _ in 0..5 {
                            sender.send_to(b"x", to).expect("loopback send");
                        }
                        let mut counts = vec![0usize; cpus + 1];
                        let deadline = Instant::now() + Duration::from_secs(2);
                        while counts.iter().sum::<usize>() < 5 && Instant::now() < deadline {
                            let all = std::iter::once(&group.main).chain(&group.per_cpu);
                            for (i, s) in all.enumerate() {
                                let mut buf = [0u8; 8];
                                while s.recv_from(&mut buf).is_ok() {
                                    counts[i] += 1;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        seen.push(counts);
                    }
                    seen
                })
                .join()
                .expect("sender thread")
        })
    }

    /// Funnelling hands every datagram to the control loop's socket, spreading hands them
    /// back to the socket of their CPU, for a dual-stack and an IPv4-only group alike.
    #[test]
    fn a_funnel_hands_every_datagram_to_the_control_loop_and_back() {
        let Some(cpus) = data_path_cpus() else {
            println!("skipping: this machine has a single CPU (or a cpuset with holes)");
            return;
        };
        for try_ipv6 in [true, false] {
            let group = bind_group_in(0, cpus, try_ipv6).expect("binding a group");
            let port = group.main.local_addr().expect("bound").port();
            let mut steering = Steering::new(None::<&OwnedFd>, &group.per_cpu).expect("steering");
            steering.funnel().expect("funnel");
            assert!(steering.is_funnelled());
            assert_eq!(
                received_per_cpu(&group, port, cpus),
                five_each(cpus, |_| 0),
                "funnelled, IPv6 tried: {try_ipv6}"
            );
            steering.spread().expect("spread");
            assert_eq!(
                received_per_cpu(&group, port, cpus),
                five_each(cpus, |cpu| cpu + 1),
                "spread again, IPv6 tried: {try_ipv6}"
            );
        }
    }

    /// A bulk batch funnels, a small one does not; the funnel holds for [`FUNNEL_HOLD`]
    /// after the last bulk batch, then spreads, and the kernel follows each step.
    #[test]
    fn bulk_batches_funnel_and_quiet_spreads_again() {
        let Some(cpus) = data_path_cpus() else {
            println!("skipping: this machine has a single CPU (or a cpuset with holes)");
            return;
        };
        let group = bind_group(0, cpus).expect("binding a group");
        let port = group.main.local_addr().expect("bound").port();
        let steering = Steering::new(None::<&OwnedFd>, &group.per_cpu).expect("steering");
        let funnel = Funnel::new(steering);
        let t0 = Instant::now();
        assert!(!funnel.note_batch(BUSY_BATCH - 1, t0), "a small batch");
        assert_eq!(funnel.spread_at(), None);
        assert_eq!(
            received_per_cpu(&group, port, cpus),
            five_each(cpus, |cpu| cpu + 1)
        );
        assert!(funnel.note_batch(BUSY_BATCH, t0), "a bulk batch funnels");
        assert!(
            !funnel.note_batch(BUSY_BATCH, t0 + FUNNEL_HOLD / 2),
            "already funnelled"
        );
        assert_eq!(received_per_cpu(&group, port, cpus), five_each(cpus, |_| 0));
        let at = funnel.spread_at().expect("funnelled");
        assert_eq!(
            at,
            t0 + FUNNEL_HOLD / 2 + FUNNEL_HOLD,
            "held after the last bulk batch"
        );
        assert!(!funnel.maybe_spread(at - Duration::from_millis(1)));
        assert!(funnel.maybe_spread(at));
        assert_eq!(funnel.spread_at(), None);
        assert_eq!(
            received_per_cpu(&group, port, cpus),
            five_each(cpus, |cpu| cpu + 1)
        );
    }

    /// The point of the group: a datagram processed on CPU `i` reaches socket `i`. Loopback
    /// delivery runs on the sender's CPU, so a sender pinned to each CPU in turn must be
    /// heard by exactly that CPU's socket.
    #[test]
    fn a_datagram_reaches_the_socket_of_the_cpu_that_processed_it() {
        let Some(cpus) = data_path_cpus() else {
            println!("skipping: this machine has a single CPU (or a cpuset with holes)");
            return;
        };
        let group = bind_group(0, cpus).expect("binding a group");
        let port = group.main.local_addr().expect("bound").port();
        assert_eq!(
            received_per_cpu(&group, port, cpus),
            five_each(cpus, |cpu| cpu + 1),
            "per sending CPU: counts per socket (main first)"
        );
    }

    /// The TUN half: with the steering program attached, a packet an application sends on
    /// CPU `i` is read from queue `i` and from no other; funnelled, every packet is read from
    /// the last queue (the control loop's), and spread again from queue `i`. Runs in a network namespace of its
    /// own thread (gone with the thread), so nothing leaves the test.
    #[test]
    fn a_packet_sent_on_a_cpu_lands_in_that_cpus_tun_queue() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipping: needs root (a TUN device in a network namespace)");
            return;
        }
        let Some(cpus) = data_path_cpus() else {
            println!("skipping: this machine has a single CPU (or a cpuset with holes)");
            return;
        };
        let seen = std::thread::spawn(move || -> io::Result<Vec<Vec<Vec<usize>>>> {
            // SAFETY: unshare moves only this thread into a new, empty network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let first = tun_rs::DeviceBuilder::new()
                .name("mvpnsteer0")
                .ipv4(std::net::Ipv4Addr::new(10, 201, 0, 1), 24, None)
                .multi_queue(true)
                .build_sync()?;
            let mut queues = vec![first];
            for _ in 0..cpus {
                let q = queues[0].try_clone()?;
                queues.push(q);
            }
            attach_cpu_steering(&queues[0], cpus)?;
            for q in &queues {
                q.set_nonblocking(true)?;
            }
            let group = bind_group(0, cpus)?;
            let mut steering = Steering::new(Some(&queues[0]), &group.per_cpu)?;
            let mut rounds = vec![round(&queues, cpus)?];
            steering.funnel()?;
            rounds.push(round(&queues, cpus)?);
            steering.spread()?;
            rounds.push(round(&queues, cpus)?);
            Ok(rounds)
        })
        .join()
        .expect("test thread")
        .expect("a multi-queue TUN with the steering program");
        let per_cpu = five_each(cpus, |cpu| cpu);
        assert_eq!(
            seen[0], per_cpu,
            "spread: our datagrams per queue, per sending CPU"
        );
        assert_eq!(seen[1], five_each(cpus, |_| cpus), "funnelled");
        assert_eq!(seen[2], per_cpu, "spread again");
    }

    /// Sends five datagrams into the TUN device of `queues` from each CPU in turn; per CPU,
    /// how many of them each queue held.
    fn round(queues: &[tun_rs::SyncDevice], cpus: usize) -> io::Result<Vec<Vec<usize>>> {
        let to: SocketAddr = (std::net::Ipv4Addr::new(10, 201, 0, 2), 9).into();
        let mut seen = Vec::new();
        for cpu in 0..cpus {
            pin_current_thread(cpu)?;
            let sender = std::net::UdpSocket::bind("10.201.0.1:0")?;
            for _ in 0..5 {
                sender.send_to(b"steer", to)?;
            }
            // Count only our datagrams (the kernel may send its own packets too).
            let mut counts = vec![0usize; queues.len()];
            let deadline = Instant::now() + Duration::from_secs(2);
            while counts.iter().sum::<usize>() < 5 && Instant::now() < deadline {
                for (i, q) in queues.iter().enumerate() {
                    let mut buf = [0u8; 2048];
                    while let Ok(n) = q.recv(&mut buf) {
                        let ours =
                            n >= 28 && buf[0] >> 4 == 4 && buf[9] == 17 && buf[22..24] == [0, 9];
                        counts[i] += usize::from(ours);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seen.push(counts);
        }
        Ok(seen)
    }
}
