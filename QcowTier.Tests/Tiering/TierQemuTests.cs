using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>
/// Tiered images and stock QEMU: QEMU refuses them by name, and every way back (export to qcow2
/// or raw, detach in place, attach on an image QEMU made) gives QEMU a clean image with the
/// guest content unchanged.
/// </summary>
public sealed class TierQemuTests
{
    private static DiskModel BuildTiered(string path, int clusterSize, long size, int seed)
    {
        var rng = new Random(seed);
        var model = new DiskModel(size, clusterSize);
        using var img = QcowImage.Create(path, size, TierKit.Tiered(clusterSize, ssdBudget: size / 4 / clusterSize * clusterSize));
        var ops = new RandomOps(rng, model, 3 * clusterSize + 100);
        for (var i = 0; i < 300; i++)
        {
            ops.Step(img);
        }
        // A long write so the budget spills to HDD for sure, then some zeroed-but-allocated clusters on HDD.
        var data = TierKit.RandomBytes(rng, (int)(size / 2));
        img.Write(size / 3, data);
        model.Write(size / 3, data);
        img.WriteZeroes(size / 2, 4L * clusterSize, mayUnmap: false);
        model.Zero(size / 2, 4L * clusterSize);
        var usage = TierKit.AssertUsageMatchesPlacement(img);
        usage.SsdBytes.Should().BeGreaterThan(0);
        usage.HddBytes.Should().BeGreaterThan(0);
        TierKit.AssertContent(img, model);
        img.Flush();
        TierKit.AssertRefcounts(img);
        return model;
    }

    [Theory]
    [InlineData(512)]
    [InlineData(65536)]
    public void Qemu_refuses_a_tiered_image_by_the_feature_name(int clusterSize)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        using (QcowImage.Create(path, 4 << 20, TierKit.Tiered(clusterSize)))
        {
        }
        foreach (var args in new[] { new[] { "info", path }, new[] { "check", path }, new[] { "compare", path, path } })
        {
            var r = Qemu.Img(args);
            r.ExitCode.Should().NotBe(0, $"qemu-img {args[0]} must refuse a tiered image");
            r.StdErr.Should().Contain("Unsupported qcow2 feature(s): QcowTier tiered layout", $"qemu-img {args[0]}");
        }
        var io = Qemu.Io("-c", "read 0 512", path);
        (io.StdOut + io.StdErr).Should().Contain("Unsupported qcow2 feature(s): QcowTier tiered layout");
        // And QEMU did not touch it: we still open it as tiered.
        using var again = QcowImage.Open(path);
        again.IsTiered.Should().BeTrue();
    }

    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    public void Export_to_qcow2_and_raw_is_clean_and_equal_for_qemu(int clusterSize)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const long size = 6 << 20;
        var model = BuildTiered(path, clusterSize, size, clusterSize);
        var raw = model.SaveRaw(dir.File("model.raw"));
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            img.ExportTo(dir.File("out.qcow2"));
            img.ExportTo(dir.File("out.raw"), raw: true);
        }
        Qemu.AssertClean(dir.File("out.qcow2"));
        Qemu.AssertSameContent(raw, dir.File("out.qcow2"), "raw", "qcow2");
        Qemu.AssertSameContent(raw, dir.File("out.raw"), "raw", "raw");
        new FileInfo(dir.File("out.raw")).Length.Should().Be(size);
        var info = Qemu.Img("info", "--output=json", dir.File("out.qcow2")).EnsureSuccess().StdOut;
        info.Should().Contain($"\"cluster-size\": {clusterSize}");
        // The tiered source is untouched.
        using var again = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        again.IsTiered.Should().BeTrue();
        TierKit.AssertContent(again, model);
    }

    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    public void Detach_gives_qemu_a_clean_image_with_the_same_content(int clusterSize)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        var model = BuildTiered(path, clusterSize, 6 << 20, clusterSize + 1);
        using (var img = QcowImage.Open(path))
        {
            // Pins and a policy too: detach must free the hints table as well.
            img.PinTier(0, 8L * clusterSize, StorageTier.Hdd);
            img.PinTier(1 << 20, 3L * clusterSize, StorageTier.Ssd);
            img.SetTierPolicy(StorageTier.Hdd, 0);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
        var info = Qemu.Img("info", path).EnsureSuccess();
        info.StdOut.Should().NotContain("QcowTier");
        // QEMU can write it and we read it back.
        Qemu.Io("-c", "write -P 0x5a 4096 8192", path).EnsureSuccess();
        model.Data.AsSpan(4096, 8192).Fill(0x5a);
        Qemu.AssertClean(path);
        using (var plain = QcowImage.Open(path))
        {
            plain.IsTiered.Should().BeFalse();
            TierKit.AssertContent(plain, model);
        }
        // QEMU grows it (rewriting the header), then it is tiered again and detached again.
        Qemu.Img("resize", "-f", "qcow2", path, (model.Size + (1 << 20)).ToString()).EnsureSuccess();
        model.Resize(model.Size + (1 << 20));
        using (var again = QcowImage.Open(path))
        {
            again.AttachTier(new QcowTierOptions { DataFile = "second.hdd" });
            again.MoveToTier(0, again.Size, StorageTier.Hdd);
            var tail = TierKit.RandomBytes(new Random(clusterSize), 100000);
            again.Write(model.Size - 100000, tail);
            model.Write(model.Size - 100000, tail);
            TierKit.AssertContent(again, model);
            again.Flush();
            TierKit.AssertRefcounts(again);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    [Theory]
    [InlineData(512)]
    [InlineData(65536)]
    public void Attach_on_a_qemu_image_move_write_detach_is_clean_for_qemu(int clusterSize)
    {
        using var dir = new TempDir();
        var path = dir.File("qemu.qcow2");
        const long size = 4 << 20;
        Qemu.Img("create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", path, size.ToString()).EnsureSuccess();
        var model = new DiskModel(size, clusterSize);
        var writes = new (long Off, int Len, byte Pattern)[]
        {
            (0, 65536, 0x11), (300000, 70000, 0x22), (1 << 20, 512 * 1024, 0x33), (2 << 20, 1000, 0x44),
            (3 << 20, 100000, 0x55), (size - 4096, 4096, 0x66),
        };
        var args = new List<string>();
        foreach (var (off, len, p) in writes)
        {
            args.Add("-c");
            args.Add($"write -P 0x{p:x2} {off} {len}");
            model.Data.AsSpan((int)off, len).Fill(p);
        }
        args.Add("-c");
        args.Add($"write -z {2 << 20} {clusterSize * 2}");
        model.Zero(2 << 20, clusterSize * 2);
        args.Add(path);
        Qemu.Io(args.ToArray()).EnsureSuccess();
        Qemu.AssertClean(path);

        var hdd = dir.File("cold.hdd");
        var rng = new Random(clusterSize);
        using (var img = QcowImage.Open(path))
        {
            img.IsTiered.Should().BeFalse();
            img.AttachTier(new QcowTierOptions { DataFile = "cold.hdd" });
            img.IsTiered.Should().BeTrue();
            img.TierDataFile.Should().Be(hdd);
            File.Exists(hdd).Should().BeTrue();
            TierKit.AssertContent(img, model, "right after attach");
            var moved = img.MoveToTier(0, size / 2, StorageTier.Hdd);
            moved.ClustersMoved.Should().BeGreaterThan(0);
            TierKit.ClusterTiers(img).Take((int)(size / 2 / clusterSize)).Should().NotContain(StorageTier.Ssd);
            for (var i = 0; i < 40; i++)
            {
                var off = rng.NextInt64(size - 9000);
                var data = TierKit.RandomBytes(rng, rng.Next(1, 9000));
                img.Write(off, data);
                model.Write(off, data);
            }
            img.SetTierPolicy(StorageTier.Hdd, 0);
            var tail = TierKit.RandomBytes(rng, 3 * clusterSize);
            img.Write(size - 3L * clusterSize, tail);
            model.Write(size - 3L * clusterSize, tail);
            TierKit.AssertContent(img, model);
        }
        // While tiered, QEMU refuses it.
        Qemu.Img("info", path).StdErr.Should().Contain("QcowTier tiered layout");
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    [Fact]
    public void Attach_refuses_version_2_images()
    {
        using var dir = new TempDir();
        var path = dir.File("v2.qcow2");
        Qemu.Img("create", "-f", "qcow2", "-o", "compat=0.10", path, "1M").EnsureSuccess();
        Qemu.Io("-c", "write -P 0x7 0 4096", path).EnsureSuccess();
        var before = File.ReadAllBytes(path);
        using (var img = QcowImage.Open(path))
        {
            img.Version.Should().Be(2);
            var act = () => img.AttachTier(new QcowTierOptions { DataFile = "x.hdd" });
            act.Should().Throw<QcowUnsupportedFeatureException>().WithMessage("*version 3*").Where(e => e.Message.Contains(path));
            img.IsTiered.Should().BeFalse();
        }
        File.Exists(dir.File("x.hdd")).Should().BeFalse();
        File.ReadAllBytes(path).Should().Equal(before, "a refused attach changes nothing");
        Qemu.AssertClean(path);

        var create = () => QcowImage.Create(dir.File("v2t.qcow2"), 1 << 20, new QcowCreateOptions
        {
            Compat = QcowCompat.V2,
            Tier = new QcowTierOptions { DataFile = "y.hdd" },
        });
        create.Should().Throw<ArgumentException>().WithMessage("*compat=1.1*");
        File.Exists(dir.File("y.hdd")).Should().BeFalse();
    }
}
