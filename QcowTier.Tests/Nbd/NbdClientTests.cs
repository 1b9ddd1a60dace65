using System.Text.Json;
using QcowTier.Nbd;
using QcowTier.Tests.Cli;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Nbd;

/// <summary>Unmodified clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against our server; results checked on the image itself.</summary>
public sealed class NbdClientTests
{
    [Fact]
    public async Task QemuIo_writes_land_in_the_image_and_read_back()
    {
        await using var s = Served.Blank();
        NbdTools.QemuIo(s.Uri,
            "write -P 0xab 0 1M",
            "write -P 0xcd 10M 4k",
            "write -P 0x11 3000 5000",          // unaligned: the engine does the read-modify-write
            "write -z 20M 1M",
            "write -P 0x22 30M 1M",
            "discard 30M 1M",
            "flush",
            "read -P 0xab 0 2048",
            "read -P 0x11 3000 5000",
            "read -P 0xcd 10M 4k",
            "read -P 0 20M 1M").EnsureSuccess();
        await s.CloseAsync();
        CliHarness.QemuIo(s.ImagePath, "qcow2",
            "read -P 0xab 0 2048",
            "read -P 0x11 3000 5000",
            "read -P 0xab 8000 1040576",
            "read -P 0xcd 10M 4k",
            "read -P 0 20M 1M",
            "read -P 0 30M 1M");
        Qemu.AssertClean(s.ImagePath);
    }

    [Fact]
    public async Task QemuImg_convert_and_compare_through_the_export()
    {
        using var dir = new TempDir();
        var mixed = CliHarness.MixedQcow(dir);
        await using (var s = Served.Start(dir, mixed, readOnly: true))
        {
            var copy = dir.File("copy.qcow2");
            Qemu.Img("convert", "-f", "raw", "-O", "qcow2", s.Uri, copy).EnsureSuccess();
            // The server holds the image's lock; qemu-img may still read it alongside with -U.
            Qemu.Img("compare", "-U", "-f", "raw", "-F", "qcow2", s.Uri, mixed).EnsureSuccess();
            await s.CloseAsync();
            Qemu.AssertSameContent(copy, mixed);
        }

        // And the other way: qemu-img writing a whole image into an export.
        var target = dir.File("target.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", target, "64M").EnsureSuccess();
        using var dir2 = new TempDir();
        await using (var t = Served.Start(dir2, target))
        {
            Qemu.Img("convert", "-n", "-f", "qcow2", "-O", "raw", mixed, t.Uri).EnsureSuccess();
            await t.CloseAsync();
        }
        Qemu.AssertSameContent(target, mixed);
        Qemu.AssertClean(target);
    }

    [Fact]
    public async Task Nbdinfo_lists_exports_and_maps_like_our_map()
    {
        using var dir = new TempDir();
        var mixed = CliHarness.MixedQcow(dir);
        await using var s = Served.Start(dir, mixed, readOnly: true);
        var list = NbdTools.Run("nbdinfo", "--list", "--json", s.Uri).EnsureSuccess();
        using (var doc = JsonDocument.Parse(list.StdOut))
        {
            var export = doc.RootElement.GetProperty("exports")[0];
            export.GetProperty("export-name").GetString().Should().Be("");
            export.GetProperty("export-size").GetInt64().Should().Be(64 << 20);
            export.GetProperty("is_read_only").GetBoolean().Should().BeTrue();
            export.GetProperty("can_multi_conn").GetBoolean().Should().BeTrue();
            export.GetProperty("block_size_preferred").GetInt64().Should().Be(65536);
            export.GetProperty("block_size_minimum").GetInt64().Should().Be(1);
            export.GetProperty("block_size_maximum").GetInt64().Should().Be(32 << 20);
            export.GetProperty("description").GetString().Should().Be("test disk");
            export.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()).Should().Equal("base:allocation");
        }

        var map = NbdTools.Run("nbdinfo", "--map", "--json", s.Uri).EnsureSuccess();
        var theirs = new List<(long Start, long Length, bool Data)>();
        using (var doc = JsonDocument.Parse(map.StdOut))
        {
            foreach (var e in doc.RootElement.EnumerateArray())
            {
                theirs.Add((e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), (e.GetProperty("type").GetInt64() & 1) == 0));
            }
        }
        var ours = new List<(long Start, long Length, bool Data)>();
        foreach (var x in s.Image.GetMap())
        {
            var data = x.Kind is QcowExtentKind.Data or QcowExtentKind.Compressed;
            if (ours.Count > 0 && ours[^1].Data == data)
            {
                ours[^1] = (ours[^1].Start, ours[^1].Length + x.Length, data);
            }
            else
            {
                ours.Add((x.Start, x.Length, data));
            }
        }
        theirs.Should().Equal(ours);
        theirs.Should().Contain(e => e.Data).And.Contain(e => !e.Data);
    }

    [Fact]
    public async Task Nbdcopy_copies_the_export_out_and_in()
    {
        using var dir = new TempDir();
        var mixed = CliHarness.MixedQcow(dir);
        var raw = dir.File("out.raw");
        await using (var s = Served.Start(dir, mixed, readOnly: true))
        {
            NbdTools.Run("nbdcopy", s.Uri, raw).EnsureSuccess();
        }
        Qemu.AssertSameContent(raw, mixed, "raw", "qcow2");

        using var dir2 = new TempDir();
        var target = dir2.File("target.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", target, "64M").EnsureSuccess();
        await using (var t = Served.Start(dir2, target))
        {
            NbdTools.Run("nbdcopy", "--connections=4", raw, t.Uri).EnsureSuccess();
            await t.CloseAsync();
        }
        Qemu.AssertSameContent(target, mixed);
        Qemu.AssertClean(target);
    }

    [Fact]
    public async Task Two_clients_at_once_both_land()
    {
        await using var s = Served.Blank();
        var a = Task.Run(() => NbdTools.QemuIo(s.Uri, "write -P 0x0a 0 8M", "read -P 0x0a 0 8M").EnsureSuccess());
        var b = Task.Run(() => NbdTools.QemuIo(s.Uri, "write -P 0x0b 16M 8M", "read -P 0x0b 16M 8M").EnsureSuccess());
        await Task.WhenAll(a, b);
        s.Server.ConnectionCount.Should().Be(0);
        await s.CloseAsync();
        CliHarness.QemuIo(s.ImagePath, "qcow2", "read -P 0x0a 0 8M", "read -P 0 8M 8M", "read -P 0x0b 16M 8M");
        Qemu.AssertClean(s.ImagePath);
    }

    [Fact]
    public async Task Read_only_export_refuses_writes()
    {
        using var dir = new TempDir();
        var mixed = CliHarness.MixedQcow(dir);
        await using var s = Served.Start(dir, mixed, readOnly: true);
        // QEMU itself refuses to open a read-only export for writing...
        NbdTools.QemuIo(s.Uri, "write -P 0x77 0 4k").StdErr.Should().Contain("Permission denied");
        NbdTools.QemuIo(s.Uri, readOnly: true, "read -P 1 64k 64k").EnsureSuccess();
        // ...and a client that writes anyway gets EPERM, for every kind of write.
        using (var c = new RawNbdClient(s.Socket))
        {
            (c.Go().Flags & 2).Should().Be(2, "NBD_FLAG_READ_ONLY");
            foreach (var (type, length) in new (ushort, uint)[] { (1, 4096), (4, 65536), (6, 65536) })
            {
                c.SendRequest(type, 0, length, cookie: type);
                if (type == 1)
                {
                    c.Send(new byte[4096]);
                }
                c.ReadSimpleReply().Should().Be((1u, (ulong)type));
            }
        }
        await s.CloseAsync();
        CliHarness.QemuIo(mixed, "qcow2", "read -P 1 64k 64k");
    }

    [Fact]
    public async Task Tiered_image_is_served_and_stays_clean()
    {
        using var dir = new TempDir();
        var path = dir.File("tiered.qcow2");
        var image = QcowImage.Create(path, 64 << 20, new QcowCreateOptions
        {
            Tier = new QcowTierOptions { DataFile = dir.File("tiered.hdd"), SsdBudget = 2 << 20 },
        });
        await using (var s = Served.Start(dir, path, image: image))
        {
            NbdTools.QemuIo(s.Uri, "write -P 0x5a 0 1M", "write -P 0x5b 8M 4M", "write -z 40M 1M", "read -P 0x5b 8M 4M").EnsureSuccess();
            await s.StopAsync();
            image.GetTierUsage().Should().NotBeNull();
            image.GetPlacement().Should().Contain(p => p.Tier == StorageTier.Hdd, "the SSD budget of 2 MiB spills the rest to the HDD file");
        }
        using var reopened = QcowImage.Open(path);
        reopened.IsTiered.Should().BeTrue();
        reopened.Check().IsClean.Should().BeTrue();
        var buffer = new byte[4 << 20];
        reopened.Read(8 << 20, buffer);
        buffer.Should().OnlyContain(b => b == 0x5b);
        reopened.Read(0, buffer.AsSpan(0, 1 << 20));
        buffer.AsSpan(0, 1 << 20).ToArray().Should().OnlyContain(b => b == 0x5a);
    }

    [Fact]
    public async Task Heat_is_recorded_for_the_ranges_read()
    {
        using var dir = new TempDir();
        var path = dir.File("disk.qcow2");
        var heatPath = dir.File("disk.heat");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "64M").EnsureSuccess();
        await using (var h = Served.Start(dir, path, heat: heatPath))
        {
            NbdTools.QemuIo(h.Uri, "write -P 1 0 1M", "read 4M 2M", "read 4M 2M").EnsureSuccess();
            await h.CloseAsync();
        }
        File.Exists(heatPath).Should().BeTrue();
        var heat = QcowTier.HeatMap.Load(heatPath);
        heat.TotalReads.Should().BeGreaterThan(0);
        heat.TotalWrites.Should().BeGreaterThan(0);
        var units = heat.TouchedUnits().ToList();
        units.Where(u => u.Start >= 4 << 20 && u.Start < 6 << 20).Should().OnlyContain(u => u.Reads >= 2).And.HaveCount((int)((2 << 20) / heat.UnitSize));
        units.Where(u => u.Start < 1 << 20).Should().OnlyContain(u => u.Writes >= 1);
    }

    [Fact]
    public async Task Stop_flushes_so_the_file_is_complete_while_still_open()
    {
        await using var s = Served.Blank();
        NbdTools.QemuIo(s.Uri, "write -P 0x42 0 3M", "write -P 0x43 50M 64k").EnsureSuccess();
        await s.StopAsync();
        // The image is still open (and locked) here: only what the stop flushed is in the file.
        Qemu.Img("check", "-U", "-f", "qcow2", s.ImagePath).EnsureSuccess();
        Qemu.Io("-U", "-r", "-f", "qcow2", "-c", "read -P 0x42 0 3M", "-c", "read -P 0x43 50M 64k", s.ImagePath).EnsureSuccess();
    }

    [Fact]
    public async Task Several_exports_are_listed_and_served_by_name()
    {
        using var dir = new TempDir();
        var a = dir.File("a.qcow2");
        var b = dir.File("b.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", a, "8M").EnsureSuccess();
        Qemu.Img("create", "-q", "-f", "qcow2", b, "16M").EnsureSuccess();
        using var ia = QcowImage.Open(a);
        using var ib = QcowImage.Open(b);
        await using var server = new NbdServer(
            [new NbdExport("a", ia), new NbdExport("b", ib) { ReadOnly = true }],
            new NbdServerOptions { UnixSocketPath = dir.File("s.sock") });
        server.Start();
        var list = NbdTools.Run("nbdinfo", "--list", "--json", server.GetUri()).EnsureSuccess();
        list.StdOut.Should().Contain("\"a\"").And.Contain("\"b\"");
        NbdTools.QemuIo(server.GetUri("a"), "write -P 9 0 1M").EnsureSuccess();
        NbdTools.QemuIo(server.GetUri("b"), readOnly: true, "read -P 0 0 1M").EnsureSuccess();
        NbdTools.QemuIo(server.GetUri("b"), "write 0 4k").StdErr.Should().Contain("Permission denied");
        NbdTools.QemuIo(server.GetUri("nope"), "read 0 4k").ExitCode.Should().NotBe(0);
        await server.StopAsync();
        var buffer = new byte[1 << 20];
        ia.Read(0, buffer);
        buffer.Should().OnlyContain(x => x == 9);
    }

    [Fact]
    public async Task Heat_is_saved_periodically_while_serving()
    {
        using var dir = new TempDir();
        var path = dir.File("disk.qcow2");
        var heatPath = dir.File("disk.heat");
        Qemu.Img("create", "-q", "-f", "qcow2", path, "16M").EnsureSuccess();
        await using var s = Served.Start(dir, path, heat: heatPath, options: new NbdServerOptions { HeatSaveInterval = TimeSpan.FromMilliseconds(100) });
        NbdTools.QemuIo(s.Uri, "write -f -P 2 0 256k", "read 0 256k").EnsureSuccess();
        for (var i = 0; i < 100 && !(File.Exists(heatPath) && QcowTier.HeatMap.Load(heatPath).TotalReads > 0); i++)
        {
            await Task.Delay(50);
        }
        QcowTier.HeatMap.Load(heatPath).TotalReads.Should().BeGreaterThan(0, "saved while the server still runs");
    }
}
