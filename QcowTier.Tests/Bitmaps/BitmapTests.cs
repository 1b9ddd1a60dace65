using QcowTier.Tests.Crash;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Bitmaps;

/// <summary>Persistent dirty bitmaps tracked through our writes, judged by QEMU's own view (qemu-nbd -B + nbdinfo --map).</summary>
public sealed class BitmapTests
{
    /// <summary>The dirty ranges QEMU exports for a bitmap.</summary>
    internal static List<(long Offset, long Length)> QemuDirty(string path, string bitmap)
    {
        var r = Qemu.Run("nbdinfo", ["--map=qemu:dirty-bitmap:" + bitmap, "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, path, "]"]).EnsureSuccess();
        var list = new List<(long, long)>();
        foreach (var line in r.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f[2] == "1")
            {
                list.Add((long.Parse(f[0], System.Globalization.CultureInfo.InvariantCulture), long.Parse(f[1], System.Globalization.CultureInfo.InvariantCulture)));
            }
        }
        return list;
    }

    /// <summary>Ranges rounded out to the granularity, merged.</summary>
    internal static List<(long Offset, long Length)> Granules(IEnumerable<(long Offset, long Length)> ranges, long granularity, long size)
    {
        var set = new SortedSet<long>();
        foreach (var (o, l) in ranges)
        {
            for (var g = o / granularity; g <= (o + l - 1) / granularity; g++)
            {
                set.Add(g);
            }
        }
        var result = new List<(long Offset, long Length)>();
        foreach (var g in set)
        {
            var start = g * granularity;
            var end = Math.Min(size, start + granularity);
            if (result.Count > 0 && result[^1].Offset + result[^1].Length == start)
            {
                result[^1] = (result[^1].Offset, end - result[^1].Offset);
            }
            else
            {
                result.Add((start, end - start));
            }
        }
        return result;
    }

    internal static string MakeImage(TempDir dir, string name = "bm.qcow2")
    {
        var path = dir.File(name);
        Qemu.Img("create", "-f", "qcow2", path, "10M").EnsureSuccess();
        Qemu.Img("bitmap", "--add", path, "b1").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "4k", path, "b2").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "512", path, "b3").EnsureSuccess();
        Qemu.Io("-c", "write 0 64k", "-c", "write 5M 4k", path).EnsureSuccess();
        Qemu.Img("bitmap", "--disable", path, "b2").EnsureSuccess();
        return path;
    }

    private static readonly (long Offset, long Length)[] QemuWrites = [(0, 64 << 10), (5 << 20, 4096)];

    [Fact]
    public async Task Enabled_bitmaps_record_exactly_our_writes_disabled_ones_stay()
    {
        using var dir = new TempDir();
        var path = MakeImage(dir);
        var size = 10L << 20;
        var b2Before = QemuDirty(path, "b2");
        var ours = new List<(long, long)> { (100_000, 3000), (3L << 20, 70_000), ((8L << 20) + 1, 1), (7L << 20, 1 << 20) };
        using (var img = QcowImage.Open(path))
        {
            img.GetBitmaps().Select(b => (b.Name, b.Granularity, b.Enabled, b.InUse)).Should().Equal(
                ("b1", 65536L, true, false), ("b2", 4096L, false, false), ("b3", 512L, true, false));
            img.Write(100_000, new byte[3000]);
            await img.WriteAsync(3L << 20, new byte[70_000]);
            img.Write((8L << 20) + 1, new byte[1]);
            img.WriteZeroes(7L << 20, 512 << 10);
            img.Discard((7L << 20) + (512 << 10), 512 << 10);
            img.GetBitmaps().Single(b => b.Name == "b1").InUse.Should().BeTrue("IN_USE is on disk while we track");
            img.GetBitmapDirtyRanges("b3").Should().Equal(Granules(QemuWrites.Concat(ours), 512, size));
        }
        Qemu.AssertClean(path);
        var info = Qemu.Img("info", path).EnsureSuccess().StdOut;
        info.Should().NotContain("in-use");
        QemuDirty(path, "b1").Should().Equal(Granules(QemuWrites.Concat(ours), 65536, size));
        QemuDirty(path, "b3").Should().Equal(Granules(QemuWrites.Concat(ours), 512, size));
        QemuDirty(path, "b2").Should().Equal(b2Before, "a disabled bitmap is not touched");
        using var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        ro.GetBitmapDirtyRanges("b1").Should().Equal(QemuDirty(path, "b1"));
        ro.GetBitmapDirtyRanges("b2").Should().Equal(b2Before);
    }

    [Fact]
    public void Extension_area_rewrites_keep_the_current_directory_pointer()
    {
        using var dir = new TempDir();
        var path = MakeImage(dir);
        using (var img = QcowImage.Open(path))
        {
            img.Write(1L << 20, new byte[100]);
            img.AddBitmap("later", 65536);      // commits: the directory moves
            _ = img.HeatIdentity;               // adds the QTID extension: the extension area is rewritten
            img.Write(2L << 20, new byte[100]);
        }
        Qemu.AssertClean(path);
        QemuDirty(path, "b1").Should().Contain((1L << 20, 65536)).And.Contain((2L << 20, 65536));
        QemuDirty(path, "later").Should().Equal([(2L << 20, 65536L)]);
    }

    [Fact]
    public void Read_only_and_idle_writable_opens_leave_the_file_unchanged()
    {
        using var dir = new TempDir();
        var path = MakeImage(dir);
        var before = File.ReadAllBytes(path);
        using (var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            ro.GetBitmaps().Should().HaveCount(3);
            ro.GetBitmapDirtyRanges("b1").Should().NotBeEmpty();
        }
        File.ReadAllBytes(path).Should().Equal(before);
        using (var rw = QcowImage.Open(path))
        {
            var b = new byte[4096];
            rw.Read(0, b);
        }
        File.ReadAllBytes(path).Should().Equal(before, "nothing was written, so no bitmap was marked or stored");
    }

    [Fact]
    public void Resize_and_snapshot_apply_keep_bitmaps_valid_for_qemu()
    {
        using var dir = new TempDir();
        var path = MakeImage(dir);
        using (var img = QcowImage.Open(path))
        {
            img.CreateSnapshot("s");
            img.Resize(20L << 20);
            img.Write(15L << 20, new byte[10]);
        }
        Qemu.AssertClean(path);
        QemuDirty(path, "b1").Should().Contain((15L << 20, 65536));
        using (var img = QcowImage.Open(path))
        {
            img.ApplySnapshot("s");
            img.Size.Should().Be(10L << 20);
        }
        Qemu.AssertClean(path);
        QemuDirty(path, "b1").Should().Equal([(0L, 10L << 20)], "an applied snapshot may change any cluster");
        Qemu.Img("info", path).EnsureSuccess().StdOut.Should().NotContain("in-use");
    }

    [Fact]
    public void Power_cut_leaves_bitmaps_in_use_or_right_never_wrong_and_trusted()
    {
        using var dir = new TempDir();
        var path = MakeImage(dir);
        var original = File.ReadAllBytes(path);
        var writes = new (long Offset, int Length)[] { (2L << 20, 5000), (9L << 20, 65536), (300, 1) };
        long total;
        {
            var s = new FaultInjectingStorage(original, "bm.qcow2");
            var start = s.WriteCount;
            Session(s);
            total = s.WriteCount - start;
        }
        var size = 10L << 20;
        var seed = 0;
        var sawInUse = false;
        var sawStored = false;
        foreach (var cut in CrashHarness.CutPoints(total, 16))
        {
            var s = new FaultInjectingStorage(original, "bm.qcow2");
            s.CutAtWrite(cut);
            try
            {
                Session(s);
            }
            catch (Exception e) when (s.IsCut)
            {
                _ = e;
            }
            var crashed = s.CrashImage(new Random(++seed), 0.5, tear: true);
            var file = dir.File($"cut{cut}.qcow2");
            File.WriteAllBytes(file, crashed);
            QemuTools.AssertNoCorruption(file);
            using var ro = QcowImage.OpenOn(new FaultInjectingStorage(crashed, file), new QcowOpenOptions { ReadOnly = true });
            var content = new byte[size];
            ro.Read(0, content);
            var b1 = ro.GetBitmaps().Single(b => b.Name == "b1");
            var qemuInfo = Qemu.Img("info", "--output=json", file).EnsureSuccess().StdOut;
            if (b1.InUse)
            {
                sawInUse = true;
                b1.Inconsistent.Should().BeTrue();
                qemuInfo.Should().Contain("in-use", "QEMU sees the bitmap as inconsistent too");
                FluentActions.Invoking(() => ro.GetBitmapDirtyRanges("b1")).Should().Throw<QcowFormatException>();
                continue;
            }
            // Trusted: every byte that differs from the original disk must be dirty.
            var dirty = QemuDirty(file, "b1");
            ro.GetBitmapDirtyRanges("b1").Should().Equal(dirty);
            foreach (var (o, l) in writes)
            {
                if (content.AsSpan((int)o, l).IndexOfAnyExcept((byte)0) >= 0)
                {
                    dirty.Should().Contain(r => r.Offset <= o && o < r.Offset + r.Length, $"cut {cut}: data at {o} landed, so the trusted bitmap must mark it");
                }
            }
            if (dirty.Count > Granules(QemuWrites, 65536, size).Count)
            {
                sawStored = true;
            }
        }
        sawInUse.Should().BeTrue();
        sawStored.Should().BeTrue();

        static void Session(FaultInjectingStorage s)
        {
            using var img = QcowImage.OpenOn(s);
            img.Write(2L << 20, Enumerable.Repeat((byte)1, 5000).ToArray());
            img.Write(9L << 20, Enumerable.Repeat((byte)2, 65536).ToArray());
            img.Flush();
            img.Write(300, [3]);
        }
    }
}

/// <summary>Power cuts during bitmap edits: the directory QEMU sees is the old one or the new one, never a torn or dangling one.</summary>
public sealed class BitmapEditCrashTests
{
    [Theory]
    [InlineData("add")]
    [InlineData("remove")]
    [InlineData("remove-all")]
    public void Power_cut_during_an_edit_leaves_the_old_or_the_new_directory(string edit)
    {
        using var dir = new TempDir();
        var path = BitmapTests.MakeImage(dir);
        var original = File.ReadAllBytes(path);
        string[] before = ["b1", "b2", "b3"];
        var after = edit switch
        {
            "add" => new[] { "b1", "b2", "b3", "new" },
            "remove" => ["b1", "b3"],
            _ => [],
        };
        long total;
        {
            var s = new FaultInjectingStorage(original, "bm.qcow2");
            var start = s.WriteCount;
            Edit(s);
            total = s.WriteCount - start;
        }
        var seed = 0;
        foreach (var cut in CrashHarness.CutPoints(total, 12))
        {
            var s = new FaultInjectingStorage(original, "bm.qcow2");
            s.CutAtWrite(cut);
            try
            {
                Edit(s);
            }
            catch (Exception e) when (s.IsCut)
            {
                _ = e;
            }
            var crashed = s.CrashImage(new Random(++seed), 0.5, tear: true);
            var file = dir.File($"{edit}-cut{cut}.qcow2");
            File.WriteAllBytes(file, crashed);
            QemuTools.AssertNoCorruption(file);
            using var ro = QcowImage.OpenOn(new FaultInjectingStorage(crashed, file), new QcowOpenOptions { ReadOnly = true });
            var names = ro.GetBitmaps().Select(b => b.Name).ToArray();
            // Removing all is three edits: each intermediate directory is a legitimate state too.
            var allowed = edit == "remove-all" ? new[] { before, ["b2", "b3"], ["b3"], after } : [before, after];
            allowed.Any(a => names.SequenceEqual(a)).Should().BeTrue($"cut {cut}: [{string.Join(",", names)}]");
            Qemu.Img("info", file).EnsureSuccess();
            foreach (var b in ro.GetBitmaps().Where(b => !b.Inconsistent))
            {
                BitmapTests.QemuDirty(file, b.Name).Should().Equal(ro.GetBitmapDirtyRanges(b.Name), $"cut {cut}: {b.Name}");
            }
        }

        void Edit(FaultInjectingStorage s)
        {
            using var img = QcowImage.OpenOn(s);
            switch (edit)
            {
                case "add": img.AddBitmap("new", 4096); break;
                case "remove": img.RemoveBitmap("b2"); break;
                default:
                    foreach (var b in before)
                    {
                        img.RemoveBitmap(b);
                    }
                    break;
            }
        }
    }
}

/// <summary>qcowtier bitmap against qemu-img bitmap: same effects (judged by qemu-img info and qemu-nbd), same errors.</summary>
public sealed class BitmapCliTests
{
    [Fact]
    public void Add_disable_enable_clear_remove_as_qemu_img()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        foreach (var p in new[] { ours, theirs })
        {
            Qemu.Img("create", "-f", "qcow2", p, "4M").EnsureSuccess();
        }
        string[][] steps =
        [
            ["--add", "a"],
            ["--add", "-g", "4k", "b"],
            ["--add", "--disable", "c"],
            ["--disable", "a"],
            ["--enable", "a"],
        ];
        foreach (var step in steps)
        {
            var args = new[] { "bitmap" }.Concat(step.Take(step.Length - 1)).ToList();
            var r = Cli.CliHarness.Run([.. args, ours, step[^1]]);
            r.ExitCode.Should().Be(0, r.StdErr);
            Qemu.Img([.. args, theirs, step[^1]]).EnsureSuccess();
        }
        Qemu.Io("-c", "write 64k 4k", ours).EnsureSuccess();
        Qemu.Io("-c", "write 64k 4k", theirs).EnsureSuccess();
        Cli.CliHarness.Run("io", "-c", "write 1M 4k", ours).ExitCode.Should().Be(0);
        Qemu.Io("-c", "write 1M 4k", theirs).EnsureSuccess();
        Qemu.AssertClean(ours);
        static string Spec(string info) => info[info.IndexOf("Format specific", StringComparison.Ordinal)..];
        Spec(Cli.CliHarness.Run("info", ours).StdOut).Should().Be(Spec(Qemu.Img("info", theirs).StdOut));
        foreach (var b in new[] { "a", "b", "c" })
        {
            BitmapTests.QemuDirty(ours, b).Should().Equal(BitmapTests.QemuDirty(theirs, b), b);
        }
        foreach (var step in new[] { new[] { "--clear", "b" }, ["--remove", "a"], ["--remove", "b"], ["--remove", "c"] })
        {
            Cli.CliHarness.Run("bitmap", step[0], ours, step[1]).ExitCode.Should().Be(0);
            Qemu.AssertClean(ours);
        }
        Qemu.Img("info", ours).EnsureSuccess().StdOut.Should().NotContain("bitmaps");
        File.ReadAllBytes(ours)[95].Should().Be(0, "no bitmaps, no autoclear bit");
    }

    [Fact]
    public void Merge_matches_qemu_img()
    {
        using var dir = new TempDir();
        var ours = BitmapTests.MakeImage(dir, "ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        File.Copy(ours, theirs);
        Qemu.Io("-c", "write 3M 10k", ours).EnsureSuccess();
        Qemu.Io("-c", "write 3M 10k", theirs).EnsureSuccess();
        foreach (var (src, dst) in new[] { ("b1", "b2"), ("b3", "b2"), ("b2", "b1") })
        {
            var r = Cli.CliHarness.Run("bitmap", "--merge", src, ours, dst);
            r.ExitCode.Should().Be(0, r.StdErr);
            Qemu.Img("bitmap", "--merge", src, theirs, dst).EnsureSuccess();
        }
        Qemu.AssertClean(ours);
        foreach (var b in new[] { "b1", "b2", "b3" })
        {
            BitmapTests.QemuDirty(ours, b).Should().Equal(BitmapTests.QemuDirty(theirs, b), b);
        }
        var q = Qemu.Img("bitmap", "--merge", "nosuch", theirs, "b1");
        var e = Cli.CliHarness.Run("bitmap", "--merge", "nosuch", ours, "b1");
        e.ExitCode.Should().Be(q.ExitCode);
        e.StdErr.Should().Be(Cli.CliHarness.AsOurs(q.StdErr));
    }

    [Theory]
    [InlineData("--remove", "nosuch")]
    [InlineData("--clear", "nosuch")]
    [InlineData("--add", "b1")]
    public void Errors_match_qemu_img(string action, string name)
    {
        using var dir = new TempDir();
        var path = BitmapTests.MakeImage(dir);
        var q = Qemu.Img("bitmap", action, path, name);
        var r = Cli.CliHarness.Run("bitmap", action, path, name);
        r.ExitCode.Should().Be(q.ExitCode);
        r.StdErr.Should().Be(Cli.CliHarness.AsOurs(q.StdErr));
    }

    /// <summary>--merge SOURCE -b FILE: another image's bitmap (granularity 64k) merged into one of 128k, as qemu-img does it.</summary>
    [Fact]
    public void Merge_from_another_image_as_qemu_img()
    {
        using var dir = new TempDir();
        var src = dir.File("src.qcow2");
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        Qemu.Img("create", "-q", "-f", "qcow2", src, "64M").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "64k", src, "s").EnsureSuccess();
        Qemu.Io("-f", "qcow2", "-c", "write 1M 100k", "-c", "write 40M 4k", src).EnsureSuccess();
        foreach (var p in new[] { ours, theirs })
        {
            Qemu.Img("create", "-q", "-f", "qcow2", p, "64M").EnsureSuccess();
            Qemu.Img("bitmap", "--add", "-g", "128k", p, "t").EnsureSuccess();
            Qemu.Io("-f", "qcow2", "-c", "write 10M 4k", p).EnsureSuccess();
        }
        Qemu.Img("bitmap", "--merge", "s", "-b", src, "-F", "qcow2", theirs, "t").EnsureSuccess();
        Cli.CliHarness.Run("bitmap", "--merge", "s", "-b", src, "-F", "qcow2", ours, "t").ExitCode.Should().Be(0);
        Qemu.AssertClean(ours);
        using (var a = QcowImage.Open(ours, new QcowOpenOptions { ReadOnly = true }))
        using (var b = QcowImage.Open(theirs, new QcowOpenOptions { ReadOnly = true }))
        {
            var dirty = a.GetBitmapDirtyRanges("t");
            dirty.Should().Equal(b.GetBitmapDirtyRanges("t"));
            dirty.Should().HaveCount(3, "the target's own write and the source's two writes");
        }

        var missing = Cli.CliHarness.Run("bitmap", "--merge", "nosuch", "-b", src, ours, "t");
        missing.ExitCode.Should().NotBe(0);
        missing.StdErr.Should().Contain("Dirty bitmap 'nosuch' not found");

        // Bitmaps of disks of different sizes cannot be merged: the same refusal as qemu-img's.
        Qemu.Img("resize", "-f", "qcow2", src, "128M").EnsureSuccess();
        var q = Qemu.Img("bitmap", "--merge", "s", "-b", src, theirs, "t");
        var r = Cli.CliHarness.Run("bitmap", "--merge", "s", "-b", src, ours, "t");
        q.ExitCode.Should().NotBe(0);
        r.ExitCode.Should().Be(q.ExitCode);
        r.StdErr.Should().Be(Cli.CliHarness.AsOurs(q.StdErr));
    }
}
