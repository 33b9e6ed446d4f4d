package datapath

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type policy_key -type policy_value -type ipcache_key -type ipcache_value -type ipcache_host_slot -type ipcache_host_bucket -type policy_exact_slot -type policy_exact_bucket -type ep_config -type ep_addrs -type global_config -type ct_key -type ct4_key -type ct_entry -type ct4_slot -type ct6_slot -type ct4_bucket -type ct6_bucket -type id_flags_key -type tunnel_lsn -type counter -type frag_key -type frag_value -type flow_event segment ../bpf/segment.c -- -I../bpf -I../bpf/include
