package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/bulkhead-io/bulkhead/cni/install"
)

// Subcommands of bulkhead-agent; without one it runs the agent.
const (
	cmdInstallCNI   = "install-cni"
	cmdUninstallCNI = "uninstall-cni"
)

// runCNIInstaller runs `install-cni` or `uninstall-cni` with args and
// returns the exit code: 2 for bad flags, 1 when the work failed.
func runCNIInstaller(name string, args []string) int {
	fs := flag.NewFlagSet("bulkhead-agent "+name, flag.ContinueOnError)
	var o install.Options
	fs.StringVar(&o.BinDir, "cni-bin-dir", install.DefaultBinDir, "CNI plugin folder")
	fs.StringVar(&o.ConfDir, "cni-conf-dir", install.DefaultConfDir, "CNI network config folder")
	fs.StringVar(&o.StateDir, "cni-state-dir", "", "where the primary's original config is kept for uninstall (default: CNI-CONF-DIR/.bulkhead); must be on the node")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	var watch, uninstallOnExit *bool
	if name == cmdInstallCNI {
		fs.StringVar(&o.PluginBinary, "plugin-binary", pluginNextToAgent(), "the bulkhead-cni binary to copy into --cni-bin-dir")
		fs.StringVar(&o.Socket, "socket", "", "agent API socket to write into the entry (default: none, the plugin's default)")
		watch = fs.Bool("watch", false, "keep running and chain bulkhead-cni again whenever the primary CNI rewrites its config")
		uninstallOnExit = fs.Bool("uninstall-on-exit", false, "with --watch: uninstall on SIGTERM or SIGINT")
	}
	fs.Usage = func() { installerUsage(fs, name, fs.Output()) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bulkhead-agent %s: unexpected argument %q\n", name, fs.Arg(0))
		return 2
	}
	if uninstallOnExit != nil && *uninstallOnExit && !*watch {
		fmt.Fprintf(os.Stderr, "bulkhead-agent %s: --uninstall-on-exit needs --watch\n", name)
		return 2
	}
	if name == cmdInstallCNI && o.PluginBinary == "" {
		fmt.Fprintf(os.Stderr, "bulkhead-agent %s: --plugin-binary: cannot find bulkhead-cni next to this binary; name it\n", name)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "bulkhead-agent %s: --log-level: %v\n", name, err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	o.Logger = log

	switch {
	case name == cmdUninstallCNI:
		if err := install.Uninstall(o); err != nil {
			log.Error("uninstall bulkhead-cni", "error", err)
			return 1
		}
		log.Info("bulkhead-cni uninstalled")
	case !*watch:
		if err := install.Install(o); err != nil {
			log.Error("install bulkhead-cni", "error", err)
			return 1
		}
	default:
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		if err := install.Watch(ctx, o); err != nil {
			log.Error("watch CNI config", "error", err)
			return 1
		}
		if *uninstallOnExit {
			if err := install.Uninstall(o); err != nil {
				log.Error("uninstall bulkhead-cni", "error", err)
				return 1
			}
			log.Info("bulkhead-cni uninstalled")
		}
	}
	return 0
}

// pluginNextToAgent is bulkhead-cni in the agent's own folder, where the
// image puts both.
func pluginNextToAgent() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	return filepath.Join(filepath.Dir(exe), "bulkhead-cni")
}
