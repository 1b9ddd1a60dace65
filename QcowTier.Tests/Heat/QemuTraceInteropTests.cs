using System.Diagnostics;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Heat;

/// <summary>Traces written by the real QEMU log trace backend (qemu-io -T) and by fio, imported.</summary>
public sealed class QemuTraceInteropTests
{
    private static string Trace(TempDir dir, string image, bool probe, params string[] commands)
    {
        var log = dir.File(probe ? "probe.log" : "plain.log");
        var args = new List<string>();
        if (!probe)
        {
            args.AddRange(["-f", "qcow2"]);
        }
        args.AddRange(["-T", $"enable=blk_co_p*,file={log}"]);
        foreach (var c in commands)
        {
            args.AddRange(["-c", c]);
        }
        args.Add(image);
        Qemu.Run("qemu-io", args).EnsureSuccess();
        File.Exists(log).Should().BeTrue("qemu-io -T file= writes the log");
        return log;
    }

    [Fact]
    public void A_qemu_io_trace_imports_the_guest_backend_not_the_format_probe()
    {
        using var dir = new TempDir();
        var img = dir.File("t.qcow2");
        Qemu.Img("create", "-f", "qcow2", img, "4M").EnsureSuccess();
        // Without -f, qemu-io opens the file once more to probe its format: a second BlockBackend.
        var log = Trace(dir, img, probe: true, "write -P 0xab 0 64k", "read 0 4k", "read 1M 8k", "write 3M 4k", "read 1M 4k");

        var map = new HeatMap(4 << 20, 4096);
        var r = HeatImport.ImportFile(log, HeatTraceFormat.QemuTrace, map);

        r.MalformedLines.Should().Be(0, string.Join("\n", r.MalformedSamples));
        r.LinesIgnored.Should().Be(0);
        r.Backends.Should().HaveCount(2);
        var guest = r.Backends[0];
        var probeBackend = r.Backends[1];
        guest.Should().Be(new HeatTraceBackend(guest.Name, 3, 2, true));
        probeBackend.Should().Be(new HeatTraceBackend(probeBackend.Name, 1, 0, false), "the probe reads the first sector once");
        guest.Name.Should().MatchRegex("^0x[0-9a-f]+$");
        r.ImportedBackend.Should().Be(guest.Name);

        Enumerable.Range(0, 16).Select(u => map.GetUnit(u).Writes).Should().AllBeEquivalentTo(1L, "the 64 KiB write covers units 0 to 15");
        map.GetUnit(16).Writes.Should().Be(0);
        map.GetUnit(0).Reads.Should().Be(1);
        map.GetUnit(256).Reads.Should().Be(2, "two reads at 1 MiB");
        map.GetUnit(257).Reads.Should().Be(1, "only the 8 KiB read reaches the second unit");
        map.GetUnit(768).Writes.Should().Be(1);
        map.TotalReadBytes.Should().Be(4096 + 8192 + 4096);
        map.TotalWriteBytes.Should().Be(65536 + 4096);

        // The same backend by name; the probe by name.
        var named = new HeatMap(4 << 20, 4096);
        HeatImport.ImportFile(log, HeatTraceFormat.QemuTrace, named, new HeatImportOptions { Device = probeBackend.Name }).IosImported.Should().Be(1);
        named.TotalReadBytes.Should().Be(512);
    }

    [Fact]
    public void A_qemu_io_trace_with_the_format_given_has_one_backend()
    {
        using var dir = new TempDir();
        var img = dir.File("t.qcow2");
        Qemu.Img("create", "-f", "qcow2", img, "2M").EnsureSuccess();
        var log = Trace(dir, img, probe: false, "write 0 64k", "read 0 4k", "readv 8k 4k 4k", "aio_write 1M 512");

        var map = new HeatMap(2 << 20, 65536);
        var r = HeatImport.ImportFile(log, HeatTraceFormat.QemuTrace, map);
        r.MalformedLines.Should().Be(0);
        r.Backends.Should().ContainSingle();
        r.ReadsImported.Should().Be(2, "readv is one request");
        r.WritesImported.Should().Be(2);
        map.GetUnit(0).Should().Be(new HeatUnit(0, 65536, 2, 1, 3));
        map.GetUnit(16).Writes.Should().Be(1);
    }

    [Fact]
    public void A_fio_write_iolog_imports_every_read_and_write()
    {
        string log;
        using var dir = new TempDir();
        if (File.Exists("/usr/bin/fio"))
        {
            log = dir.File("fio.log");
            var data = dir.File("f.dat");
            var psi = new ProcessStartInfo("fio") { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in new[] { "--name=t", $"--filename={data}", "--size=1M", "--rw=randrw", "--bs=4k", "--ioengine=psync", $"--write_iolog={log}", "--randseed=7", "--output=/dev/null" })
            {
                psi.ArgumentList.Add(a);
            }
            using var p = Process.Start(psi)!;
            p.StandardOutput.ReadToEnd();
            p.StandardError.ReadToEnd();
            p.WaitForExit(60_000).Should().BeTrue();
            p.ExitCode.Should().Be(0);
        }
        else
        {
            // No fio on this machine: the lines fio 3.33 wrote for a similar job, kept by hand.
            log = dir.File("fio.log");
            File.WriteAllText(log, TraceImportTests.FioV3);
        }
        var lines = File.ReadAllLines(log);
        lines[0].Should().Be("fio version 3 iolog");
        var reads = lines.Count(l => l.Split(' ') is [_, _, "read", _, _]);
        var writes = lines.Count(l => l.Split(' ') is [_, _, "write", _, _]);

        var map = new HeatMap(1 << 20, 4096);
        var start = new DateTimeOffset(2024, 1, 1, 0, 0, 0, TimeSpan.Zero);
        var r = HeatImport.ImportFile(log, HeatTraceFormat.FioIolog, map, new HeatImportOptions { TraceStart = start });
        r.MalformedLines.Should().Be(0);
        r.ReadsImported.Should().Be(reads);
        r.WritesImported.Should().Be(writes);
        r.LinesIgnored.Should().Be(lines.Length - reads - writes, "the header and the add, open and close lines");
        map.TouchedUnits().Sum(u => u.Reads).Should().Be(reads, "4 KiB aligned I/Os touch one unit each");
        map.TouchedUnits().Sum(u => u.Writes).Should().Be(writes);
        (r.LastIo!.Value - start).Should().BeLessThan(TimeSpan.FromMinutes(1), "fio writes microseconds since the job started");
    }
}
