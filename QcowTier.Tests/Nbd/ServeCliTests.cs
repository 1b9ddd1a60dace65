using System.Diagnostics;
using System.Runtime.InteropServices;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Nbd;

/// <summary>qcowtier serve as a real process: it says where it listens, serves, and on SIGTERM/SIGINT drains, flushes, saves heat and exits 0.</summary>
public sealed partial class ServeCliTests
{
    [LibraryImport("libc", SetLastError = true)]
    private static partial int kill(int pid, int sig);

    private static Process StartServe(params string[] args)
    {
        var cli = Path.Combine(AppContext.BaseDirectory, "QcowTier.Cli.dll");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(cli);
        psi.ArgumentList.Add("serve");
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        return Process.Start(psi) ?? throw new InvalidOperationException("cannot start qcowtier serve");
    }

    /// <summary>Reads stdout lines until the export lines are printed; returns them.</summary>
    private static List<string> WaitListening(Process p, int exports)
    {
        var lines = new List<string>();
        var read = Task.Run(() =>
        {
            while (lines.Count < 1 + exports && p.StandardOutput.ReadLine() is { } line)
            {
                lines.Add(line);
            }
        });
        if (!read.Wait(TimeSpan.FromSeconds(20)) || lines.Count < 1 + exports)
        {
            p.Kill(entireProcessTree: true);
            throw new Xunit.Sdk.XunitException($"serve did not start: {string.Join('\n', lines)}\n{p.StandardError.ReadToEnd()}");
        }
        return lines;
    }

    private static (int Code, string Out, string Err) Stop(Process p, int signal)
    {
        kill(p.Id, signal).Should().Be(0);
        if (!p.WaitForExit(20000))
        {
            p.Kill(entireProcessTree: true);
            throw new Xunit.Sdk.XunitException("serve did not stop on its signal");
        }
        return (p.ExitCode, p.StandardOutput.ReadToEnd(), p.StandardError.ReadToEnd());
    }

    [Fact]
    public void Serve_records_heat_and_stops_cleanly_on_SIGTERM()
    {
        using var dir = new TempDir();
        var image = dir.File("disk.qcow2");
        var heat = dir.File("disk.heat");
        var socket = dir.File("s.sock");
        Qemu.Img("create", "-q", "-f", "qcow2", image, "32M").EnsureSuccess();
        using var p = StartServe("--socket", socket, "--record-heat", heat, image);
        var lines = WaitListening(p, 1);
        lines[0].Should().Be($"listening on unix:{socket}");
        lines[1].Should().Contain($"nbd+unix:///?socket={socket}");
        NbdTools.QemuIo($"nbd+unix:///?socket={socket}", "write -P 0x66 0 2M", "read -P 0x66 0 2M", "read 8M 1M").EnsureSuccess();
        var (code, output, err) = Stop(p, 15);
        (code, err).Should().Be((0, ""));
        output.Should().Contain("stopped");
        File.Exists(socket).Should().BeFalse("the socket file is removed at exit");
        Qemu.AssertClean(image);
        CliHarness.QemuIo(image, "qcow2", "read -P 0x66 0 2M", "read -P 0 2M 30M");
        var map = QcowTier.HeatMap.Load(heat);
        map.TotalReads.Should().BeGreaterThan(0);
        map.TouchedUnits().Should().Contain(u => u.Start == 8 << 20 && u.Reads > 0);
    }

    [Fact]
    public void Serve_several_files_over_tcp_read_only_until_SIGINT()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", a, "8M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", b, "8M").EnsureSuccess();
        CliHarness.QemuIo(b, "qcow2", "write -P 0xbb 0 1M");
        using var p = StartServe("-r", "--port", "0", a, b);
        var lines = WaitListening(p, 2);
        lines[0].Should().StartWith("listening on 127.0.0.1:");
        var uriB = lines[2][(lines[2].IndexOf("nbd://", StringComparison.Ordinal))..];
        uriB.Should().EndWith("/b.qcow2");
        NbdTools.QemuIo(uriB, readOnly: true, "read -P 0xbb 0 1M").EnsureSuccess();
        var (code, _, err) = Stop(p, 2);
        (code, err).Should().Be((0, ""));
    }

    [Fact]
    public void Serve_usage_errors_are_one_line()
    {
        CliHarness.Run("serve").ShouldBeOneLineError("Expecting at least one image file name");
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", a, "8M").EnsureSuccess();
        CliHarness.Run("serve", "-x", "one", "-x", "two", a).ShouldBeOneLineError("--export-name");
        CliHarness.Run("serve", "--socket", dir.File("s"), "--port", "1", a).ShouldBeOneLineError("mutually exclusive");
        CliHarness.Run("serve", "--port", "99999", a).ShouldBeOneLineError("--port");
        CliHarness.Run("serve", dir.File("missing.qcow2")).ShouldBeOneLineError("Could not open");
        CliHarness.Run("serve", "--help").StdOut.Should().Contain("--record-heat");
    }
}
