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
	/* a successful exec: str[0] the file, str[1..2] argv; args[0] argv's
	 * length, args[1] the executable's link count, args[2] the shell's
	 * socket fd (-1: none), args[3] that socket's family; target_ino the
	 * executable's inode; rules the exec rules it matched */
	SM_EXEC = 7,
	/* cgroup hooks: these can deny the operation before it happens */
	SM_CONNECT_UNIX = 8, /* connect to a runtime socket: str[0..1] sun_path */
	SM_SOCK_CREATE = 9,  /* raw IP socket: args family, type, protocol */
	SM_SYSCTL = 10,      /* write to /proc/sys: str[0..1] name, str[2] new value */
	/* socket(AF_PACKET): a tracepoint, since sock_create runs for inet
	 * sockets only */
	SM_PACKET_SOCKET = 11,
	SM_CHROOT = 12,     /* chroot: str[0] the path */
	SM_PIVOT_ROOT = 13, /* pivot_root: str[0] new_root, str[1] put_old */
	/* setuid, setreuid, setresuid (syscall_nr tells which) to root from
	 * a caller whose real uid is not root: args the uids asked for */
	SM_SETUID = 14,
	/* capset adding capabilities the caller does not hold: args[0..2]
	 * effective, permitted, inheritable asked for; target_ino the
	 * caller's permitted set */
	SM_CAPSET = 15,
	/* connect (TCP or UDP) to a cloud instance metadata address
	 * (sysmon_metadata_addrs): str[0] the address's 16 bytes (IPv4
	 * v4-mapped), args[0] the family, args[1] the port (host order) */
	SM_CONNECT_METADATA = 16,
	/* open, openat or openat2 (syscall_nr tells which) of a path an open
	 * rule matches: str[0..1] the path as the caller wrote it, args[0] the
	 * flags (0 for openat2), rules the rule's bit */
	SM_OPEN = 17,
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
	SMR_CHROOT = 1 << 10,       /* chroot and pivot_root */
	SMR_FILELESS_EXEC = 1 << 11, /* exec of a file with no link on disk */
	SMR_TMP_EXEC = 1 << 12,     /* exec from /tmp or /dev/shm */
	SMR_REVERSE_SHELL = 1 << 13, /* a shell whose stdin or stdout is a socket */
	SMR_SETUID_ROOT = 1 << 14,  /* setuid to root or capset from non-root */
	/* 1 << 15 is BH-RT-016, the agent's scan rule: no kernel hook */
	SMR_METADATA = 1 << 16, /* connect to a cloud metadata address */
	SMR_RAW_DEVICE = 1 << 17, /* open of kernel memory or a raw disk */
	SMR_SHADOW = 1 << 18,     /* open of a password hash file */
};

/* Key of sysmon_open_prefixes: a path prefix (NUL-padded) whose opens an
 * open rule reports; the value is the rule's bit. Prefixes are 7, 8, 9, 11
 * or 12 bytes long (the lengths open_prefix_rule tries). */
#define SYSMON_OPEN_PREFIX 16
#define SYSMON_OPEN_PREFIXES 32
struct sysmon_open_prefix {
	char p[SYSMON_OPEN_PREFIX];
};

/* Key of sysmon_metadata_addrs: an address (IPv4 v4-mapped, network
 * order) whose connects BH-RT-017 reports. */
struct sysmon_addr {
	__u32 addr[4];
};
#define SYSMON_METADATA_ADDRS 16

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
	/* The rule bits (SMR_*) the kernel matched for this event: set by the
	 * hooks whose rules need what only the kernel sees (exec: the
	 * executable's link count, the shell's stdio), where one event can
	 * match several rules. 0 for the others, which Go judges. */
	__u32 rules;
	/* The subset of rules the pod's kill mask has: the rules the
	 * SIGKILL (SMF_KILLED) was queued for. */
	__u32 kill_rules;
};
