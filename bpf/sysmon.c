// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The system monitor: syscall hooks attributed to endpoints.
 *
 * Each hooked syscall has its own tracepoint (syscalls/sys_enter_*), so that
 * the syscalls nobody hooks pay nothing. The one exception is module loading
 * on a kernel without CONFIG_MODULES: there, syscalls/sys_enter_init_module and
 * sys_enter_finit_module do not exist, so sysmon_sys_enter (raw_tp sys_enter,
 * which runs for every syscall) filters by syscall number instead. Go attaches
 * it only where the per-syscall tracepoints are missing.
 *
 * Attribution: every event carries the calling task's network namespace inode
 * and its cgroup ID. Only tasks whose netns inode is in sysmon_watched (filled
 * by Go, one entry per endpoint) produce events; the rest are counted and
 * dropped before the ring buffer. A failed ring-buffer reserve is counted in
 * sysmon_counters, never silent.
 *
 * Tracepoints observe, and can kill: every hook runs at syscall entry,
 * before the syscall has taken effect, and the syscall may still fail
 * afterwards. Where the pod's kill mask has the rule's bit, the hook queues
 * SIGKILL (bpf_send_signal) for the caller. The signal is delivered on the
 * way back to user space, so the syscall itself runs first: a mount
 * happens, a setns switches namespaces, and only then does the process
 * die. A kill ends the process; it does not undo the syscall.
 *
 * The cgroup hooks (connect_unix, sock_create, sysctl) run before the
 * operation and can deny it: the caller sees EPERM. They use the same
 * watched map, so only pods' processes pay more than the lookup. Whether
 * they deny is the pod's block mask; the verdict never depends on the ring
 * buffer having room.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#include "sysmon.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Anchors: bpf2go exports only types that are in the object's BTF. */
struct sysmon_event *unused_sysmon_event __attribute__((unused));
enum sysmon_kind unused_sysmon_kind __attribute__((unused));
enum sysmon_counter unused_sysmon_counter __attribute__((unused));
enum sysmon_rule_bit unused_sysmon_rule_bit __attribute__((unused));
struct sysmon_sock_name *unused_sysmon_sock_name __attribute__((unused));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define SOCK_RAW 3
#define SIGKILL 9
#define CLONE_NEWNS 0x00020000
#define CLONE_NEWUSER 0x10000000
#define PTRACE_ATTACH 16
#define PTRACE_SEIZE 0x4206
#define SUN_PATH 108

/* Syscall numbers of init_module and finit_module on the running
 * architecture; Go sets them at load time. */
const volatile __s64 nr_init_module = -1;
const volatile __s64 nr_finit_module = -1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);   /* netns inode */
	__type(value, struct sysmon_watch);
	__uint(max_entries, 4096);
} sysmon_watched SEC(".maps");

/* Container runtime socket file names, filled by Go. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sysmon_sock_name);
	__type(value, __u8);
	__uint(max_entries, SYSMON_SOCK_NAMES);
} sysmon_sock_names SEC(".maps");

/* Cloud instance metadata addresses, filled by Go. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sysmon_addr);
	__type(value, __u8);
	__uint(max_entries, SYSMON_METADATA_ADDRS);
} sysmon_metadata_addrs SEC(".maps");

/* The container runtime's set-up inside a pod. A task that joins a watched
 * network namespace by setns from outside it is the runtime (runc's init
 * joining the pod's sandbox) or a tool of the node's, not the pod: until it
 * execs, its setns, unshare, mount, chroot and pivot_root are the set-up
 * of a container (runc unshares, mounts the rootfs, /proc and /dev, and
 * pivots into it), and no rule judges them. The mark passes to the tasks
 * it forks (runc's init clones its last stage after joining) and ends at
 * exec: from there on the program is the pod's. A pod's own processes
 * never join their namespace from outside, so they are never marked.
 * Keyed by thread ID; the value is the task's start time, so that a reused
 * ID never inherits a mark. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);   /* thread ID */
	__type(value, __u64); /* the task's start_time */
	__uint(max_entries, 8192);
} sysmon_entering SEC(".maps");

static __always_inline void mark_entering(struct task_struct *task)
{
	__u32 pid = BPF_CORE_READ(task, pid);
	__u64 start = BPF_CORE_READ(task, start_time);

	bpf_map_update_elem(&sysmon_entering, &pid, &start, BPF_ANY);
}

static __always_inline bool entering(struct task_struct *task)
{
	__u32 pid = BPF_CORE_READ(task, pid);
	__u64 *start = bpf_map_lookup_elem(&sysmon_entering, &pid);

	return start && *start == BPF_CORE_READ(task, start_time);
}

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024); /* Go may resize it before load */
} sysmon_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SMC_MAX);
} sysmon_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&sysmon_counters, &which);

	if (c)
		*c += 1; /* per-CPU: no atomics needed */
}

/* watch_of is the watch of the task's network namespace, or NULL (and
 * counted) for a task in no watched one. */
static __always_inline struct sysmon_watch *watch_of(struct task_struct *task, __u32 *netns)
{
	struct sysmon_watch *w;

	*netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	w = bpf_map_lookup_elem(&sysmon_watched, netns);
	if (!w)
		count(SMC_UNWATCHED);
	return w;
}

/* reserve reserves an event with the common fields filled in; NULL (and
 * counted as lost) when the ring buffer is full. */
static __always_inline struct sysmon_event *reserve(struct task_struct *task, __u32 netns, __u16 kind, long nr)
{
	struct sysmon_event *e = bpf_ringbuf_reserve(&sysmon_events, sizeof(*e), 0);

	if (!e) {
		count(SMC_LOST);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns = netns;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->start_ns = BPF_CORE_READ(task, group_leader, start_time);
	e->kind = kind;
	e->syscall_nr = nr;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

static __always_inline void send(struct sysmon_event *e)
{
	bpf_ringbuf_submit(e, 0);
	count(SMC_SENT);
}

/* kill queues SIGKILL for the caller when the pod's kill mask has bit,
 * before any event is reserved: a full ring buffer must not spare the
 * process. Returns the flags that record the outcome. */
static __always_inline __u16 kill(struct sysmon_watch *w, __u32 bit)
{
	if (!(w->kill & bit))
		return 0;
	return bpf_send_signal(SIGKILL) == 0 ? SMF_KILLED : SMF_KILL_FAILED;
}

/* copy_args copies a syscall's first n (at most 4) arguments. A macro, not
 * a function: the verifier refuses loads through a context pointer that has
 * been offset, which passing ctx->args would make. n must be the syscall's
 * own argument count: a per-syscall tracepoint's record holds only those,
 * and the kernel refuses to attach a program that reads past the record
 * (EACCES). */
#define copy_args(e, ctx, n)                                  \
	do {                                                  \
		if ((n) > 0) (e)->args[0] = (ctx)->args[0]; \
		if ((n) > 1) (e)->args[1] = (ctx)->args[1]; \
		if ((n) > 2) (e)->args[2] = (ctx)->args[2]; \
		if ((n) > 3) (e)->args[3] = (ctx)->args[3]; \
	} while (0)

/* simple_hook is a tracepoint hook whose rule matches on the syscall
 * alone (or on its first argument, in match): it kills when the pod says
 * so, then reports the first nargs arguments. */
#define simple_hook(ctx, kind, nargs, bit, match)                                   \
	({                                                                          \
		struct task_struct *__t = (struct task_struct *)bpf_get_current_task(); \
		struct sysmon_watch *__w;                                           \
		struct sysmon_event *__e;                                           \
		__u32 __ns;                                                         \
		__u16 __f = 0;                                                      \
		__w = watch_of(__t, &__ns);                                         \
		if (__w) {                                                          \
			if (match)                                                  \
				__f = kill(__w, (bit));                             \
			__e = reserve(__t, __ns, (kind), (ctx)->id);                \
			if (__e) {                                                  \
				copy_args(__e, (ctx), (nargs));                     \
				__e->flags |= __f;                                  \
			}                                                           \
		} else {                                                            \
			__e = NULL;                                                 \
		}                                                                   \
		__e;                                                                \
	})

/* fd_inode is the inode number of the file at fd in the current task; for
 * a namespace file that is the namespace's inode. 0 when fd is not open. */
static __always_inline __u64 fd_inode(struct task_struct *task, long fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	unsigned int max = BPF_CORE_READ(fdt, max_fds);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;

	if (fd < 0 || fd >= max)
		return 0;
	if (bpf_core_read(&f, sizeof(f), fds + fd) || !f)
		return 0;
	return BPF_CORE_READ(f, f_inode, i_ino);
}

/* own_namespace reports whether inum is one of the task's own namespaces. */
static __always_inline bool own_namespace(struct task_struct *task, __u64 inum)
{
	struct nsproxy *nsp = BPF_CORE_READ(task, nsproxy);

	return inum == BPF_CORE_READ(nsp, net_ns, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, mnt_ns, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, uts_ns, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, ipc_ns, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, pid_ns_for_children, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, cgroup_ns, ns.inum) ||
	       inum == BPF_CORE_READ(nsp, time_ns, ns.inum) ||
	       inum == BPF_CORE_READ(task, cred, user_ns, ns.inum);
}

SEC("tracepoint/syscalls/sys_enter_setns")
int sysmon_setns(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sysmon_watch *w;
	struct sysmon_event *e;
	__u16 flags = 0;
	__u64 target;
	__u32 netns;

	w = watch_of(task, &netns);
	if (!w) {
		/* Joining a pod from outside: the runtime's set-up begins. */
		__u32 ino = fd_inode(task, (long)ctx->args[0]);

		if (ino && bpf_map_lookup_elem(&sysmon_watched, &ino))
			mark_entering(task);
		return 0;
	}
	if (entering(task))
		return 0;
	target = fd_inode(task, (long)ctx->args[0]);
	if (target && own_namespace(task, target))
		flags |= SMF_TARGET_OWN;
	else if (target)
		flags |= kill(w, SMR_SETNS); /* BH-RT-001's match */
	e = reserve(task, netns, SM_SETNS, ctx->id);
	if (!e)
		return 0;
	copy_args(e, ctx, 2);
	e->target_ino = target;
	e->flags = flags;
	send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_unshare")
int sysmon_unshare(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e;

	if (entering((struct task_struct *)bpf_get_current_task()))
		return 0;
	e = simple_hook(ctx, SM_UNSHARE, 1, SMR_UNSHARE, ctx->args[0] & (CLONE_NEWUSER | CLONE_NEWNS));
	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mount")
int sysmon_mount(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e;

	if (entering((struct task_struct *)bpf_get_current_task()))
		return 0;
	e = simple_hook(ctx, SM_MOUNT, 4, SMR_MOUNT, true);
	if (!e)
		return 0;
	/* dev_name, dir_name, type: user strings, any of them may be NULL. */
	bpf_probe_read_user_str(e->str[0], sizeof(e->str[0]), (void *)ctx->args[0]);
	bpf_probe_read_user_str(e->str[1], sizeof(e->str[1]), (void *)ctx->args[1]);
	bpf_probe_read_user_str(e->str[2], sizeof(e->str[2]), (void *)ctx->args[2]);
	send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_ptrace")
int sysmon_ptrace(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = simple_hook(ctx, SM_PTRACE, 4, SMR_PTRACE,
					     ctx->args[0] == PTRACE_ATTACH || ctx->args[0] == PTRACE_SEIZE);

	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_bpf")
int sysmon_bpf(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = simple_hook(ctx, SM_BPF, 3, SMR_BPF, true);

	if (e)
		send(e);
	return 0;
}

/* cgroup/sock_create runs in inet_create and inet6_create only, so an
 * AF_PACKET socket is seen here, where it can be killed but not denied.
 * The family test comes before the map lookup: socket() is common. */
SEC("tracepoint/syscalls/sys_enter_socket")
int sysmon_socket(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e;

	if (ctx->args[0] != AF_PACKET)
		return 0;
	e = simple_hook(ctx, SM_PACKET_SOCKET, 3, SMR_PACKET_SOCK, true);
	if (e)
		send(e);
	return 0;
}

/* A prefix of the exec'd path that marks a world-writable scratch folder
 * (BH-RT-013): the path as the exec gave it. */
static __always_inline bool has_prefix(const char *s, const char *p, int n)
{
	for (int i = 0; i < n; i++) /* n is a constant: unrolled */
		if (s[i] != p[i])
			return false;
	return true;
}

static __always_inline bool tmp_path(const char *file)
{
	return has_prefix(file, "/tmp/", 5) || has_prefix(file, "/dev/shm/", 9);
}

/* comm_is compares the task's comm with a name, its NUL included. */
#define comm_is(comm, lit) has_prefix((comm), lit, sizeof(lit))

/* A shell (BH-RT-014), by the comm the exec gave the task: the basename of
 * the file exec'd (busybox's applets exec'd through a link are named by
 * the link). */
static __always_inline bool is_shell(const char *comm)
{
	return comm_is(comm, "sh") || comm_is(comm, "bash") || comm_is(comm, "dash") || comm_is(comm, "ash") ||
	       comm_is(comm, "zsh") || comm_is(comm, "ksh") || comm_is(comm, "busybox");
}

#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* sock_family is the address family of the socket at fd in fds, or -1
 * when fd is not open or not a socket. */
static __always_inline int sock_family(struct file **fds, unsigned int max, int fd)
{
	struct socket *sock;
	struct file *f = NULL;
	umode_t mode;

	if ((unsigned int)fd >= max)
		return -1;
	if (bpf_core_read(&f, sizeof(f), fds + fd) || !f)
		return -1;
	mode = BPF_CORE_READ(f, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return -1;
	sock = BPF_CORE_READ(f, private_data);
	return BPF_CORE_READ(sock, sk, __sk_common.skc_family);
}

/* Execs in watched namespaces feed Go's process cache, so that alerts
 * carry the process and its ancestry. The exec rules are judged here too,
 * from what only the kernel sees, at no cost beyond the exec itself: a
 * Kill queues SIGKILL before the new program runs an instruction (the
 * exec itself has happened). */
SEC("tracepoint/sched/sched_process_exec")
int sysmon_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	unsigned long start, end, len;
	char file[SYSMON_STR] = {};
	char comm[16] = {};
	__u32 netns, rules = 0;
	__s64 sockfd = -1;
	int family = -1;
	struct sysmon_watch *w;
	struct sysmon_event *e;
	struct file *exe;
	struct mm_struct *mm;
	__u32 nlink = 1, pid;
	__u16 flags;

	/* The program exec'd is the pod's: a set-up mark ends here. */
	pid = ctx->old_pid;
	bpf_map_delete_elem(&sysmon_entering, &pid);
	pid = ctx->pid;
	bpf_map_delete_elem(&sysmon_entering, &pid);
	w = watch_of(task, &netns);
	if (!w)
		return 0;
	bpf_probe_read_kernel_str(file, sizeof(file), (void *)ctx + (ctx->__data_loc_filename & 0xFFFF));
	bpf_get_current_comm(comm, sizeof(comm));
	mm = BPF_CORE_READ(task, mm);
	exe = BPF_CORE_READ(mm, exe_file);
	if (exe) {
		/* memfd_create's files ("memfd:<name>") and O_TMPFILE's ("#<ino>"):
		 * no name on any file system. A file deleted or renamed over
		 * after the exec opened it has no link either, and is no
		 * attack: a package upgrade (write x.new, rename over x) racing
		 * an exec of x does that. It is told apart by its name. */
		char name[6] = {};

		nlink = BPF_CORE_READ(exe, f_inode, i_nlink);
		bpf_probe_read_kernel(name, sizeof(name), BPF_CORE_READ(exe, f_path.dentry, d_name.name));
		if (nlink == 0 && (has_prefix(name, "memfd:", 6) || name[0] == '#'))
			rules |= SMR_FILELESS_EXEC;
	}
	if (tmp_path(file))
		rules |= SMR_TMP_EXEC;
	if (is_shell(comm)) {
		struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
		unsigned int max = BPF_CORE_READ(fdt, max_fds);
		struct file **fds = BPF_CORE_READ(fdt, fd);

		family = sock_family(fds, max, 0);
		sockfd = 0;
		if (family < 0) {
			family = sock_family(fds, max, 1);
			sockfd = 1;
		}
		if (family >= 0)
			rules |= SMR_REVERSE_SHELL;
		else
			sockfd = -1;
	}
	flags = kill(w, rules);
	e = reserve(task, netns, SM_EXEC, -1);
	if (!e)
		return 0;
	e->flags = flags;
	e->rules = rules;
	e->kill_rules = flags ? (w->kill & rules) : 0;
	__builtin_memcpy(e->str[0], file, sizeof(file));
	start = BPF_CORE_READ(mm, arg_start);
	end = BPF_CORE_READ(mm, arg_end);
	len = end - start;
	if (len > 2 * SYSMON_STR)
		len = 2 * SYSMON_STR;
	e->args[0] = end - start; /* argv's full length */
	e->args[1] = nlink;
	e->args[2] = sockfd;
	e->args[3] = family;
	if (exe)
		e->target_ino = BPF_CORE_READ(exe, f_inode, i_ino);
	if (len > 0)
		bpf_probe_read_user(e->str[1], len, (void *)start);
	send(e);
	return 0;
}

/* The open rules (BH-RT-018 kernel memory and raw disks, BH-RT-019
 * password hash files) match the path as the caller wrote it: a prefix
 * from sysmon_open_prefixes for paths under /dev/ and /proc/, or a name
 * ending in etc/shadow or etc/gshadow. A relative path through a directory
 * fd, a link, or a bind mount under another name is not seen. */
#define OPEN_PATH 128

struct sysmon_path {
	char p[OPEN_PATH];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sysmon_open_prefix);
	__type(value, __u32);
	__uint(max_entries, SYSMON_OPEN_PREFIXES);
} sysmon_open_prefixes SEC(".maps");

/* The path being judged: too big for the stack next to the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct sysmon_path);
	__uint(max_entries, 1);
} sysmon_path_scratch SEC(".maps");

#define TRY_PREFIX(L)                                                    \
	if (len >= (L)) {                                                \
		__builtin_memset(&k, 0, sizeof(k));                      \
		__builtin_memcpy(k.p, p, (L));                           \
		bit = bpf_map_lookup_elem(&sysmon_open_prefixes, &k);    \
		if (bit)                                                 \
			return *bit;                                     \
	}

static __always_inline __u32 open_prefix_rule(const char *p, __u32 len)
{
	struct sysmon_open_prefix k;
	__u32 *bit;

	TRY_PREFIX(7)
	TRY_PREFIX(8)
	TRY_PREFIX(9)
	TRY_PREFIX(11)
	TRY_PREFIX(12)
	return 0;
}

/* ends_with reports whether the path of length len ends in suf (n bytes,
 * a literal), at its start or after a '/'. Indexes are masked into the
 * buffer for the verifier; len < OPEN_PATH keeps them right. */
static __always_inline bool ends_with(const char *p, __u32 len, const char *suf, __u32 n)
{
	__u32 off;

	if (len < n || len >= OPEN_PATH)
		return false;
	off = len - n;
#pragma unroll
	for (__u32 i = 0; i < 11; i++) {
		if (i < n && p[(off + i) & (OPEN_PATH - 1)] != suf[i])
			return false;
	}
	return off == 0 || p[(off - 1) & (OPEN_PATH - 1)] == '/';
}

static __always_inline int open_hook(const char *upath, long nr, __u64 flags)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sysmon_watch *w;
	struct sysmon_event *e;
	struct sysmon_path *buf;
	__u32 netns, len, bit = 0, zero = 0;
	__u16 f;
	long n;

	w = watch_of(task, &netns);
	if (!w || entering(task))
		return 0;
	buf = bpf_map_lookup_elem(&sysmon_path_scratch, &zero);
	if (!buf)
		return 0;
	n = bpf_probe_read_user_str(buf->p, OPEN_PATH, upath);
	if (n <= 1)
		return 0;
	len = n - 1;
	if (buf->p[0] == '/' && (buf->p[1] == 'd' || buf->p[1] == 'p'))
		bit = open_prefix_rule(buf->p, len);
	if (!bit && (ends_with(buf->p, len, "etc/shadow", 10) || ends_with(buf->p, len, "etc/gshadow", 11)))
		bit = SMR_SHADOW;
	if (!bit)
		return 0;
	f = kill(w, bit);
	e = reserve(task, netns, SM_OPEN, nr);
	if (!e)
		return 0;
	e->flags = f;
	e->rules = bit;
	e->args[0] = flags;
	__builtin_memcpy(e->str[0], buf->p, SYSMON_STR);
	__builtin_memcpy(e->str[1], buf->p + SYSMON_STR, SYSMON_STR);
	send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int sysmon_openat(struct trace_event_raw_sys_enter *ctx)
{
	return open_hook((const char *)ctx->args[1], ctx->id, ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_enter_open")
int sysmon_open(struct trace_event_raw_sys_enter *ctx)
{
	return open_hook((const char *)ctx->args[0], ctx->id, ctx->args[1]);
}

/* openat2's flags are in its open_how, which is not read. */
SEC("tracepoint/syscalls/sys_enter_openat2")
int sysmon_openat2(struct trace_event_raw_sys_enter *ctx)
{
	return open_hook((const char *)ctx->args[1], ctx->id, 0);
}

/* chroot and pivot_root (BH-RT-011): a pod that changes its root is
 * leaving the file system the runtime gave it, or making one to leave by. */
SEC("tracepoint/syscalls/sys_enter_chroot")
int sysmon_chroot(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e;

	if (entering((struct task_struct *)bpf_get_current_task()))
		return 0;
	e = simple_hook(ctx, SM_CHROOT, 1, SMR_CHROOT, true);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->str[0], sizeof(e->str[0]), (void *)ctx->args[0]);
	send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_pivot_root")
int sysmon_pivot_root(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e;

	if (entering((struct task_struct *)bpf_get_current_task()))
		return 0;
	e = simple_hook(ctx, SM_PIVOT_ROOT, 2, SMR_CHROOT, true);
	if (!e)
		return 0;
	bpf_probe_read_user_str(e->str[0], sizeof(e->str[0]), (void *)ctx->args[0]);
	bpf_probe_read_user_str(e->str[1], sizeof(e->str[1]), (void *)ctx->args[1]);
	send(e);
	return 0;
}

/* ns_root_uid is the kernel uid that is root in the task's user namespace:
 * 0 for the initial one, the mapped uid in a pod with a user namespace.
 * (__u32)-1 when the map has no uid 0. */
static __always_inline __u32 ns_root_uid(struct task_struct *task)
{
	struct user_namespace *ns = BPF_CORE_READ(task, cred, user_ns);
	__u32 n = BPF_CORE_READ(ns, uid_map.nr_extents);

	if (n > 5) {
		/* Past 5 extents the map is an array sorted by first id: uid 0,
		 * when mapped, is the first extent's. */
		struct uid_gid_extent *fw = BPF_CORE_READ(ns, uid_map.forward);
		struct uid_gid_extent x = {};

		if (bpf_core_read(&x, sizeof(x), fw) == 0 && x.first == 0)
			return x.lower_first;
		return (__u32)-1;
	}
	for (__u32 i = 0; i < 5; i++) {
		if (i >= n)
			break;
		if (BPF_CORE_READ(ns, uid_map.extent[i].first) == 0)
			return BPF_CORE_READ(ns, uid_map.extent[i].lower_first);
	}
	return (__u32)-1;
}

/* setuid, setreuid and setresuid to root (BH-RT-015) from a caller whose
 * real uid is neither the node's root nor root in its user namespace: the syscall succeeds only
 * for a setuid-root program or with CAP_SETUID, and both are the attack.
 * -1 (leave unchanged) is not root. The uid tests come before the map
 * lookup: these syscalls are rare, but cheap to rule out. */
static __always_inline void setuid_hook(struct trace_event_raw_sys_enter *ctx, int nargs)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 root, ruid = (__u32)bpf_get_current_uid_gid();
	struct sysmon_event *e;
	bool to_root = false;

	/* Not a loop: the verifier refuses loads through an offset ctx. */
	if ((__u32)ctx->args[0] == 0)
		to_root = true;
	if (nargs > 1 && (__u32)ctx->args[1] == 0)
		to_root = true;
	if (nargs > 2 && (__u32)ctx->args[2] == 0)
		to_root = true;
	if (!to_root)
		return;
	/* The node's root, in whatever user namespace, is no elevation. */
	if (ruid == 0)
		return;
	root = ns_root_uid(task);
	if (ruid == root)
		return;
	if (nargs == 1)
		e = simple_hook(ctx, SM_SETUID, 1, SMR_SETUID_ROOT, true);
	else if (nargs == 2)
		e = simple_hook(ctx, SM_SETUID, 2, SMR_SETUID_ROOT, true);
	else
		e = simple_hook(ctx, SM_SETUID, 3, SMR_SETUID_ROOT, true);
	if (!e)
		return;
	e->args[3] = BPF_CORE_READ(task, cred, euid.val);
	send(e);
}

SEC("tracepoint/syscalls/sys_enter_setuid")
int sysmon_setuid(struct trace_event_raw_sys_enter *ctx)
{
	setuid_hook(ctx, 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_setreuid")
int sysmon_setreuid(struct trace_event_raw_sys_enter *ctx)
{
	setuid_hook(ctx, 2);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_setresuid")
int sysmon_setresuid(struct trace_event_raw_sys_enter *ctx)
{
	setuid_hook(ctx, 3);
	return 0;
}

#define LINUX_CAPABILITY_VERSION_1 0x19980330

/* capset (BH-RT-015) from a caller whose real uid is not root (as for
 * setuid), asking for a capability its permitted set lacks (or, for the
 * inheritable set, that neither set has): capset never grants that, so it
 * is an attempt to gain one. Dropping capabilities (the common capset)
 * does not match. */
SEC("tracepoint/syscalls/sys_enter_capset")
int sysmon_capset(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 ruid = (__u32)bpf_get_current_uid_gid();
	struct { __u32 version; int pid; } hdr = {};
	struct { __u32 eff, perm, inh; } data[2] = {};
	struct sysmon_event *e;
	__u64 eff, perm, inh, have = 0, inh_have = 0;
	const struct cred *cred;

	if (ruid == 0 || ruid == ns_root_uid(task))
		return 0;
	if (bpf_probe_read_user(&hdr, sizeof(hdr), (void *)ctx->args[0]))
		return 0;
	if (bpf_probe_read_user(&data[0], sizeof(data[0]), (void *)ctx->args[1]))
		return 0;
	if (hdr.version != LINUX_CAPABILITY_VERSION_1 &&
	    bpf_probe_read_user(&data[1], sizeof(data[1]), (void *)ctx->args[1] + sizeof(data[0])))
		return 0;
	eff = data[0].eff | (__u64)data[1].eff << 32;
	perm = data[0].perm | (__u64)data[1].perm << 32;
	inh = data[0].inh | (__u64)data[1].inh << 32;
	/* Read as 64 bits, whatever the kernel's kernel_cap_t (a u64 since
	 * 6.3, a u32[2] before). */
	cred = BPF_CORE_READ(task, cred);
	bpf_core_read(&have, sizeof(have), &cred->cap_permitted);
	bpf_core_read(&inh_have, sizeof(inh_have), &cred->cap_inheritable);
	/* The inheritable set may keep what it has beyond the permitted one. */
	if (!((eff | perm) & ~have) && !(inh & ~(have | inh_have)))
		return 0;
	e = simple_hook(ctx, SM_CAPSET, 2, SMR_SETUID_ROOT, true);
	if (!e)
		return 0;
	e->args[0] = eff;
	e->args[1] = perm;
	e->args[2] = inh;
	e->args[3] = (__u32)hdr.pid;
	e->target_ino = have;
	send(e);
	return 0;
}

/* A task in the runtime's set-up passes its mark to the tasks it forks
 * (see sysmon_entering). Every fork on the node runs this: one lookup. */
SEC("raw_tracepoint/sched_process_fork")
int sysmon_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx->args[0];
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	__u32 pid;

	if (!entering(parent))
		return 0;
	pid = BPF_CORE_READ(child, pid);
	__u64 start = BPF_CORE_READ(child, start_time);
	bpf_map_update_elem(&sysmon_entering, &pid, &start, BPF_ANY);
	return 0;
}

/* Module loads, on kernels that have the per-syscall tracepoints. */
SEC("tracepoint/syscalls/sys_enter_init_module")
int sysmon_init_module(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = simple_hook(ctx, SM_MODULE, 3, SMR_MODULE, true);

	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_finit_module")
int sysmon_finit_module(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = simple_hook(ctx, SM_MODULE, 3, SMR_MODULE, true);

	if (e)
		send(e);
	return 0;
}

/* Module loads where those tracepoints are missing (no CONFIG_MODULES): the
 * syscall still exists and returns ENOSYS, and an attempt is worth an
 * alert. Runs for every syscall, so the number test comes first. */
SEC("raw_tracepoint/sys_enter")
int sysmon_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task;
	long nr = (long)ctx->args[1];
	struct sysmon_watch *w;
	struct sysmon_event *e;
	struct pt_regs *regs;
	__u16 flags;
	__u32 netns;

	if (nr != nr_init_module && nr != nr_finit_module)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	w = watch_of(task, &netns);
	if (!w)
		return 0;
	flags = kill(w, SMR_MODULE);
	e = reserve(task, netns, SM_MODULE, nr);
	if (!e)
		return 0;
	e->flags = flags;
	regs = (struct pt_regs *)ctx->args[0];
	e->args[0] = PT_REGS_PARM1_CORE_SYSCALL(regs);
	e->args[1] = PT_REGS_PARM2_CORE_SYSCALL(regs);
	e->args[2] = PT_REGS_PARM3_CORE_SYSCALL(regs);
	send(e);
	return 0;
}

/* ---- cgroup hooks: these can deny ---- */

/* deny records a cgroup hook's verdict for the pod's rule bit: 0 (deny,
 * EPERM) when the pod blocks it, 1 (allow) otherwise. */
static __always_inline int verdict(struct sysmon_watch *w, __u32 bit, __u16 *flags)
{
	if (!(w->block & bit))
		return 1;
	count(SMC_BLOCKED);
	*flags |= SMF_BLOCKED;
	return 0;
}

/* A sun_path being scanned: its length and where its last component
 * starts. path has room past SUN_PATH so that a copy of SYSMON_SOCK_NAME
 * bytes from any start stays in it. */
struct sun_scan {
	char path[160]; /* SUN_PATH + SYSMON_SOCK_NAME, rounded up */
	__u32 max;
	__u32 len;
	__u32 base;
};

static long sun_scan_step(__u64 i, struct sun_scan *s)
{
	char c;

	if (i >= s->max || i >= SUN_PATH)
		return 1;
	c = s->path[i & 127];
	if (c == 0)
		return 1;
	s->len = i + 1;
	if (c == '/')
		s->base = i + 1;
	return 0;
}

/* The connect's path is matched as the caller wrote it: its last component
 * against sysmon_sock_names. See the README for what that misses. A
 * bpf_loop keeps the verifier's work linear in the path's length. */
SEC("cgroup/connect_unix")
int sysmon_connect_unix(struct bpf_sock_addr *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sysmon_sock_name name = {};
	struct bpf_sock_addr_kern *sa;
	struct sun_scan sc = {};
	struct sysmon_watch *w;
	struct sysmon_event *e;
	__u32 netns, n, base;
	__u16 flags = 0;
	int allow;

	w = watch_of(task, &netns);
	if (!w)
		return 1;
	sa = bpf_cast_to_kern_ctx(ctx);
	sc.max = sa->uaddrlen;
	if (sc.max <= 2)
		return 1;
	sc.max -= 2; /* sun_family */
	if (bpf_probe_read_kernel(sc.path, SUN_PATH, (char *)sa->uaddr + 2))
		return 1;
	/* An abstract socket (leading NUL) has no file name to match. */
	bpf_loop(SUN_PATH, sun_scan_step, &sc, 0);
	base = sc.base;
	if (sc.len <= base)
		return 1;
	n = sc.len - base;
	if (n > SYSMON_SOCK_NAME || base > SUN_PATH)
		return 1;
	if (bpf_probe_read_kernel(name.name, n, sc.path + base))
		return 1;
	if (!bpf_map_lookup_elem(&sysmon_sock_names, &name))
		return 1;
	allow = verdict(w, SMR_RUNTIME_SOCK, &flags);
	e = reserve(task, netns, SM_CONNECT_UNIX, -1);
	if (e) {
		e->flags = flags;
		e->args[0] = sc.len;
		__builtin_memcpy(e->str, sc.path, SUN_PATH);
		send(e);
	}
	return allow;
}

SEC("cgroup/sock_create")
int sysmon_sock_create(struct bpf_sock *sk)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 family = sk->family, type = sk->type;
	struct sysmon_watch *w;
	struct sysmon_event *e;
	__u16 flags = 0;
	__u32 netns;
	int allow;

	if (!((family == AF_INET || family == AF_INET6) && type == SOCK_RAW))
		return 1;
	w = watch_of(task, &netns);
	if (!w)
		return 1;
	allow = verdict(w, SMR_RAW_SOCK, &flags);
	e = reserve(task, netns, SM_SOCK_CREATE, -1);
	if (e) {
		e->flags = flags;
		e->args[0] = family;
		e->args[1] = type;
		e->args[2] = sk->protocol;
		send(e);
	}
	return allow;
}

SEC("cgroup/sysctl")
int sysmon_sysctl(struct bpf_sysctl *ctx)
{
	struct task_struct *task;
	struct sysmon_watch *w;
	struct sysmon_event *e;
	__u16 flags = 0;
	__u32 netns;
	int allow;

	if (!ctx->write)
		return 1;
	task = (struct task_struct *)bpf_get_current_task();
	w = watch_of(task, &netns);
	if (!w)
		return 1;
	allow = verdict(w, SMR_SYSCTL, &flags);
	e = reserve(task, netns, SM_SYSCTL, -1);
	if (e) {
		e->flags = flags;
		e->args[0] = ctx->file_pos;
		bpf_sysctl_get_name(ctx, (char *)e->str, 2 * SYSMON_STR, 0);
		bpf_sysctl_get_new_value(ctx, e->str[2], SYSMON_STR);
		send(e);
	}
	return allow;
}

/* metadata_connect judges a connect to addr (v4-mapped for IPv4): one hash
 * lookup for every connect on the node, and the watch lookup only for a
 * metadata address, which ordinary traffic never is. */
static __always_inline int metadata_connect(const struct sysmon_addr *addr, __u32 family, __u16 port)
{
	struct task_struct *task;
	struct sysmon_watch *w;
	struct sysmon_event *e;
	__u16 flags = 0;
	__u32 netns;
	int allow;

	if (!bpf_map_lookup_elem(&sysmon_metadata_addrs, addr))
		return 1;
	task = (struct task_struct *)bpf_get_current_task();
	w = watch_of(task, &netns);
	if (!w)
		return 1;
	allow = verdict(w, SMR_METADATA, &flags);
	e = reserve(task, netns, SM_CONNECT_METADATA, -1);
	if (e) {
		e->flags = flags;
		e->args[0] = family;
		e->args[1] = bpf_ntohs(port);
		__builtin_memcpy(e->str[0], addr->addr, 16);
		send(e);
	}
	return allow;
}

SEC("cgroup/connect4")
int sysmon_connect4(struct bpf_sock_addr *ctx)
{
	struct sysmon_addr a = { .addr = { 0, 0, bpf_htonl(0xffff), ctx->user_ip4 } };

	return metadata_connect(&a, AF_INET, (__u16)ctx->user_port);
}

SEC("cgroup/connect6")
int sysmon_connect6(struct bpf_sock_addr *ctx)
{
	struct sysmon_addr a = {};

	a.addr[0] = ctx->user_ip6[0];
	a.addr[1] = ctx->user_ip6[1];
	a.addr[2] = ctx->user_ip6[2];
	a.addr[3] = ctx->user_ip6[3];
	return metadata_connect(&a, AF_INET6, (__u16)ctx->user_port);
}
