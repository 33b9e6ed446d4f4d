/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared between bpf/sysmon.c and Go (runtime package). Every struct
 * is a bpf2go -type; keep them free of implicit padding. */
#pragma once

#include "vmlinux.h"

/* sysmon_event.kind */
enum sysmon_kind {
	SM_SETNS = 1,
	SM_UNSHARE = 2,
	SM_MOUNT = 3,
	SM_PTRACE = 4,
	SM_BPF = 5,
	SM_MODULE = 6, /* init_module or finit_module: syscall_nr tells which */
	SM_EXEC = 7,   /* a successful exec: str[0] the file, str[1..2] argv */
	/* cgroup hooks: these can deny the operation before it happens */
	SM_CONNECT_UNIX = 8, /* connect to a runtime socket: str[0..1] sun_path */
	SM_SOCK_CREATE = 9,  /* raw IP socket: args family, type, protocol */
	SM_SYSCTL = 10,      /* write to /proc/sys: str[0..1] name, str[2] new value */
	/* socket(AF_PACKET): a tracepoint, since sock_create runs for inet
	 * sockets only */
	SM_PACKET_SOCKET = 11,
};

/* Rule bits of sysmon_watch.block and .kill: bit i is rule BH-RT-(i+1).
 * Go (runtime/detect) keeps the same numbering. */
enum sysmon_rule_bit {
	SMR_SETNS = 1 << 0,
	SMR_UNSHARE = 1 << 1,
	SMR_MOUNT = 1 << 2,
	SMR_PTRACE = 1 << 3,
	SMR_BPF = 1 << 4,
	SMR_MODULE = 1 << 5,
	SMR_RUNTIME_SOCK = 1 << 6,
	SMR_RAW_SOCK = 1 << 7,
	SMR_SYSCTL = 1 << 8,
	SMR_PACKET_SOCK = 1 << 9,
};

/* sysmon_event.flags */
enum sysmon_flag {
	/* setns: the target is one of the caller's own namespaces. */
	SMF_TARGET_OWN = 1 << 0,
	/* a cgroup hook denied the operation: the caller saw EPERM */
	SMF_BLOCKED = 1 << 1,
	/* bpf_send_signal(SIGKILL) was queued for the caller */
	SMF_KILLED = 1 << 2,
	/* bpf_send_signal failed: the kill was asked for and not done */
	SMF_KILL_FAILED = 1 << 3,
};

/* sysmon_counters indexes */
enum sysmon_counter {
	SMC_SENT = 0,      /* events submitted to the ring buffer */
	SMC_LOST = 1,      /* ring-buffer reserve failed: event lost */
	SMC_UNWATCHED = 2, /* hook ran for a task in an unwatched netns */
	SMC_BLOCKED = 3,   /* operations a cgroup hook denied */
	SMC_MAX = 4,
};

/* Value of sysmon_watched. endpoint is Go's handle for the watch; block
 * and kill are the pod's rule actions as SMR_* bits: block is honoured by
 * the cgroup hooks only, kill by the tracepoints only (Go rejects the other
 * combinations before they get here). */
struct sysmon_watch {
	__u32 endpoint;
	__u32 block;
	__u32 kill;
	__u32 pad;
};

/* Key of sysmon_sock_names: a container runtime socket's file name (the
 * path's last component), NUL-padded. */
#define SYSMON_SOCK_NAME 32
#define SYSMON_SOCK_NAMES 8
struct sysmon_sock_name {
	char name[SYSMON_SOCK_NAME];
};

#define SYSMON_STR 64

struct sysmon_event {
	__u64 ts_ns;     /* CLOCK_MONOTONIC */
	__u64 cgroup_id;
	__u64 args[4];   /* the syscall's first arguments, raw */
	__u64 target_ino; /* setns: inode of the fd's file (the namespace) */
	__s64 syscall_nr; /* -1 for SM_EXEC */
	__u64 start_ns;   /* the task's start time: with pid, names the process */
	__u32 netns;     /* caller's network namespace inode */
	__u32 pid;       /* thread group */
	__u32 tid;
	__u32 ppid;
	__u32 uid;
	__u16 kind;
	__u16 flags;
	char comm[16];
	/* mount: source, target, fstype; exec: filename, then argv (NUL
	 * separated, truncated) across str[1] and str[2] */
	char str[3][SYSMON_STR];
};
