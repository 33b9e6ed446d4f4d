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
};

/* sysmon_event.flags */
enum sysmon_flag {
	/* setns: the target is one of the caller's own namespaces. */
	SMF_TARGET_OWN = 1 << 0,
};

/* sysmon_counters indexes */
enum sysmon_counter {
	SMC_SENT = 0,      /* events submitted to the ring buffer */
	SMC_LOST = 1,      /* ring-buffer reserve failed: event lost */
	SMC_UNWATCHED = 2, /* hook ran for a task in an unwatched netns */
	SMC_MAX = 3,
};

/* Value of sysmon_watched. endpoint is Go's handle for the watch; flags
 * are reserved for per-endpoint rule switches. */
struct sysmon_watch {
	__u32 endpoint;
	__u32 flags;
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
