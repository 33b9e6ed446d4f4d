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
 * Tracepoints observe only: every hook runs at syscall entry, before the
 * syscall has taken effect, and the syscall may still fail afterwards.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "sysmon.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Anchors: bpf2go exports only types that are in the object's BTF. */
struct sysmon_event *unused_sysmon_event __attribute__((unused));
enum sysmon_kind unused_sysmon_kind __attribute__((unused));
enum sysmon_counter unused_sysmon_counter __attribute__((unused));

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

/* begin filters by netns and reserves an event with the common fields
 * filled in; NULL means nothing is to be sent. */
static __always_inline struct sysmon_event *begin(struct task_struct *task, __u16 kind, long nr)
{
	__u32 netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	struct sysmon_event *e;

	if (!bpf_map_lookup_elem(&sysmon_watched, &netns)) {
		count(SMC_UNWATCHED);
		return NULL;
	}
	e = bpf_ringbuf_reserve(&sysmon_events, sizeof(*e), 0);
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

#define sys_event(ctx, kind, nargs)                                                           \
	({                                                                                     \
		struct sysmon_event *__e =                                                     \
			begin((struct task_struct *)bpf_get_current_task(), (kind), (ctx)->id); \
		if (__e)                                                                       \
			copy_args(__e, (ctx), (nargs));                                        \
		__e;                                                                           \
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
	struct sysmon_event *e = begin(task, SM_SETNS, ctx->id);

	if (!e)
		return 0;
	copy_args(e, ctx, 2);
	e->target_ino = fd_inode(task, (long)ctx->args[0]);
	if (e->target_ino && own_namespace(task, e->target_ino))
		e->flags |= SMF_TARGET_OWN;
	send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_unshare")
int sysmon_unshare(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = sys_event(ctx, SM_UNSHARE, 1);

	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mount")
int sysmon_mount(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = sys_event(ctx, SM_MOUNT, 4);

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
	struct sysmon_event *e = sys_event(ctx, SM_PTRACE, 4);

	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_bpf")
int sysmon_bpf(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = sys_event(ctx, SM_BPF, 3);

	if (e)
		send(e);
	return 0;
}

/* Execs in watched namespaces feed Go's process cache, so that alerts
 * carry the process and its ancestry. */
SEC("tracepoint/sched/sched_process_exec")
int sysmon_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct sysmon_event *e = begin(task, SM_EXEC, -1);
	unsigned long start, end, len;
	struct mm_struct *mm;

	if (!e)
		return 0;
	bpf_probe_read_kernel_str(e->str[0], sizeof(e->str[0]), (void *)ctx + (ctx->__data_loc_filename & 0xFFFF));
	mm = BPF_CORE_READ(task, mm);
	start = BPF_CORE_READ(mm, arg_start);
	end = BPF_CORE_READ(mm, arg_end);
	len = end - start;
	if (len > 2 * SYSMON_STR)
		len = 2 * SYSMON_STR;
	e->args[0] = end - start; /* argv's full length */
	if (len > 0)
		bpf_probe_read_user(e->str[1], len, (void *)start);
	send(e);
	return 0;
}

/* Module loads, on kernels that have the per-syscall tracepoints. */
SEC("tracepoint/syscalls/sys_enter_init_module")
int sysmon_init_module(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = sys_event(ctx, SM_MODULE, 3);

	if (e)
		send(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_finit_module")
int sysmon_finit_module(struct trace_event_raw_sys_enter *ctx)
{
	struct sysmon_event *e = sys_event(ctx, SM_MODULE, 3);

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
	long nr = (long)ctx->args[1];
	struct pt_regs *regs;
	struct sysmon_event *e;

	if (nr != nr_init_module && nr != nr_finit_module)
		return 0;
	e = begin((struct task_struct *)bpf_get_current_task(), SM_MODULE, nr);
	if (!e)
		return 0;
	regs = (struct pt_regs *)ctx->args[0];
	e->args[0] = PT_REGS_PARM1_CORE_SYSCALL(regs);
	e->args[1] = PT_REGS_PARM2_CORE_SYSCALL(regs);
	e->args[2] = PT_REGS_PARM3_CORE_SYSCALL(regs);
	send(e);
	return 0;
}
