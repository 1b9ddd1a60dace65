using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>Undamaged images of every shape: both checkers find nothing, and report the same allocation figures.</summary>
public sealed class CheckCleanImageTests
{
    public static TheoryData<string, string> Shapes() => new()
    {
        { "default", "" },
        { "512-byte clusters", "cluster_size=512" },
        { "4 KiB clusters", "cluster_size=4096" },
        { "2 MiB clusters", "cluster_size=2097152" },
        { "1-bit refcounts", "refcount_bits=1" },
        { "2-bit refcounts", "refcount_bits=2" },
        { "4-bit refcounts", "refcount_bits=4" },
        { "8-bit refcounts", "refcount_bits=8" },
        { "32-bit refcounts", "refcount_bits=32" },
        { "64-bit refcounts", "refcount_bits=64" },
        { "version 2", "compat=0.10" },
        { "lazy refcounts", "lazy_refcounts=on" },
        { "metadata preallocation", "preallocation=metadata" },
        { "512-byte clusters, 64-bit refcounts", "cluster_size=512,refcount_bits=64" },
    };

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Figures_match_qemu(string shape, string options)
    {
        _ = shape;
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        var args = new List<string> { "create", "-f", "qcow2" };
        if (options.Length > 0)
        {
            args.Add("-o");
            args.Add(options);
        }
        args.AddRange([path, "96M"]);
        CheckHarness.QemuImgOk([.. args]);
        // Out-of-order writes fragment the host layout; compressed and zero clusters add the other kinds.
        var writes = new List<string>
        {
            "write -P 0x11 40M 256k",
            "write -P 0x12 0 192k",
            "write -P 0x13 20M 64k",
            "write -P 0x14 64k 64k",
            "write -z 41M 64k",
            "discard 20M 64k",
        };
        if (!options.Contains("preallocation", StringComparison.Ordinal))
        {
            // Compression needs whole, unallocated clusters.
            writes.Add("write -c -P 0x15 60M 2M");
            writes.Add("write -c -P 0x16 64M 2M");
        }
        CheckHarness.QemuIoOk(path, [.. writes]);

        var qemu = CheckHarness.Qemu(path);
        var ours = CheckHarness.Ours(path);

        qemu.ExitCode.Should().Be(0, qemu.ToString());
        ours.ShouldMatchFigures(qemu);
        ours.Messages.Should().BeEmpty();
    }

    [Fact]
    public void Empty_image_matches_qemu()
    {
        using var dir = new TempDir();
        var path = dir.File("empty.qcow2");
        CheckHarness.QemuImgOk("create", "-f", "qcow2", path, "1G");

        var ours = CheckHarness.Ours(path);

        ours.ShouldMatchFigures(CheckHarness.Qemu(path));
        ours.AllocatedClusters.Should().Be(0);
        ours.TotalClusters.Should().Be(1L << 30 >> 16);
    }

    [Fact]
    public void Image_written_by_our_engine_is_clean_for_both_tools()
    {
        using var dir = new TempDir();
        var path = dir.File("ours.qcow2");
        var rng = new Random(7);
        using (var image = QcowImage.Create(path, 256L << 20, new QcowCreateOptions { ClusterSize = 4096 }))
        {
            var buffer = new byte[48 * 1024];
            for (var i = 0; i < 200; i++)
            {
                rng.NextBytes(buffer);
                var offset = rng.NextInt64(0, (256L << 20) - buffer.Length) & ~511L;
                image.Write(offset, buffer);
            }
            image.Flush();
            // A check through the open, writable image sees the same as a fresh read-only one.
            image.Check().IsClean.Should().BeTrue();
        }

        var qemu = CheckHarness.Qemu(path);
        qemu.ExitCode.Should().Be(0, qemu.ToString());
        CheckHarness.Ours(path).ShouldMatchFigures(qemu);
    }

    [Fact]
    public void Repair_of_a_clean_image_changes_nothing()
    {
        using var dir = new TempDir();
        var path = CheckDamageTests.BuildBase(dir);
        var before = File.ReadAllBytes(path);

        var result = CheckHarness.Ours(path, QcowRepairMode.All);

        result.IsClean.Should().BeTrue();
        result.CorruptionsFixed.Should().Be(0);
        result.LeaksFixed.Should().Be(0);
        File.ReadAllBytes(path).Should().Equal(before);
    }
}
