package runtime

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -D__TARGET_ARCH_x86" -target bpfel -type sysmon_event -type sysmon_watch -type sysmon_sock_name -type sysmon_addr -type sysmon_open_prefix sysmon ../bpf/sysmon.c -- -I../bpf -I../bpf/include
