using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Hostile.Support.HostileImage;

namespace QcowTier.Tests.Hostile;

/// <summary>
/// Damaged headers: every one must be refused at open with a typed exception naming the file, the field
/// and the problem; never a hang, a crash or a huge allocation. QEMU refuses the same images.
/// </summary>
public sealed class HeaderTests
{
    private sealed record Case(Action<HostileImage> Patch, Type Expected, string[] Fragments, bool QemuRefuses = true);

    private static readonly Dictionary<string, Case> Cases = new()
    {
        ["truncated-to-0"] = new(i => i.Truncate(0), typeof(QcowFormatException), ["header"]),
        ["truncated-in-v2-part"] = new(i => i.Truncate(50), typeof(QcowFormatException), ["header"]),
        ["truncated-in-v3-part"] = new(i => i.Truncate(90), typeof(QcowFormatException), ["header"]),
        ["truncated-in-extensions"] = new(i => i.Truncate(130), typeof(QcowFormatException), [], QemuRefuses: false), // QEMU reads the missing bytes as zeroes
        ["bad-magic"] = new(i => i.SetU32(0, 0x514649fc), typeof(QcowFormatException), ["magic"]),
        ["version-1"] = new(i => i.SetU32(VersionField, 1), typeof(QcowUnsupportedFeatureException), ["version 1"]),
        ["version-4"] = new(i => i.SetU32(VersionField, 4), typeof(QcowUnsupportedFeatureException), ["version 4"]),
        ["version-huge"] = new(i => i.SetU32(VersionField, 0xffffffff), typeof(QcowUnsupportedFeatureException), ["version"]),
        ["cluster-bits-8"] = new(i => i.SetU32(ClusterBits, 8), typeof(QcowFormatException), ["cluster_bits", "8"]),
        ["cluster-bits-22"] = new(i => i.SetU32(ClusterBits, 22), typeof(QcowFormatException), ["cluster_bits", "22"]),
        ["cluster-bits-huge"] = new(i => i.SetU32(ClusterBits, 0xffffffff), typeof(QcowFormatException), ["cluster_bits"]),
        ["size-absurd"] = new(i => i.SetU64(Size, long.MaxValue), typeof(QcowFormatException), ["size"]),
        ["size-negative"] = new(i => i.SetU64(Size, ulong.MaxValue), typeof(QcowFormatException), ["size"]),
        ["size-2^62"] = new(i => i.SetU64(Size, 1UL << 62), typeof(QcowFormatException), ["size"]),
        ["l1-size-huge"] = new(i => i.SetU32(L1Size, 0x7fffffff), typeof(QcowFormatException), ["l1_size"]),
        ["l1-size-max-u32"] = new(i => i.SetU32(L1Size, 0xffffffff), typeof(QcowFormatException), ["l1_size"]),
        ["l1-size-too-small"] = new(i => i.SetU32(L1Size, 0), typeof(QcowFormatException), ["l1_size", "small"]),
        ["l1-size-too-small-for-size"] = new(i => i.SetU64(Size, 1UL << 40), typeof(QcowFormatException), ["l1_size", "small"]),
        ["l1-offset-misaligned"] = new(i => i.SetU64(L1TableOffset, (ulong)i.L1Offset + 512), typeof(QcowFormatException), ["l1_table_offset"]),
        ["l1-offset-beyond-file"] = new(i => i.SetU64(L1TableOffset, 1UL << 40), typeof(QcowFormatException), ["l1_table_offset"], QemuRefuses: false),
        ["l1-offset-near-2^64"] = new(i => i.SetU64(L1TableOffset, 0xffffffffffff0000), typeof(QcowFormatException), ["l1_table_offset"]),
        ["l1-offset-zero"] = new(i => i.SetU64(L1TableOffset, 0), typeof(QcowFormatException), ["l1_table_offset"], QemuRefuses: false),
        ["l1-table-past-eof"] = new(i => i.SetU32(L1Size, (uint)((i.Bytes.Length - i.L1Offset) / 8 + 1)), typeof(QcowFormatException), ["l1_table_offset", "end of the file"], QemuRefuses: false),
        ["refcount-table-misaligned"] = new(i => i.SetU64(RefcountTableOffset, (ulong)i.RefcountTable + 8), typeof(QcowFormatException), ["refcount_table_offset"]),
        ["refcount-table-beyond-file"] = new(i => i.SetU64(RefcountTableOffset, 1UL << 40), typeof(QcowFormatException), ["refcount_table_offset"], QemuRefuses: false),
        ["refcount-table-zero"] = new(i => i.SetU64(RefcountTableOffset, 0), typeof(QcowFormatException), ["refcount_table_offset"], QemuRefuses: false),
        ["refcount-table-near-2^64"] = new(i => i.SetU64(RefcountTableOffset, 0xffffffffffff0000), typeof(QcowFormatException), ["refcount_table_offset"]),
        ["refcount-table-clusters-0"] = new(i => i.SetU32(RefcountTableClusters, 0), typeof(QcowFormatException), ["refcount_table_clusters"]),
        ["refcount-table-clusters-huge"] = new(i => i.SetU32(RefcountTableClusters, 0xffffffff), typeof(QcowFormatException), ["refcount_table_clusters"]),
        ["refcount-table-clusters-past-eof"] = new(i => i.SetU32(RefcountTableClusters, 100), typeof(QcowFormatException), ["refcount_table_offset", "end of the file"], QemuRefuses: false),
        ["refcount-order-7"] = new(i => i.SetU32(RefcountOrder, 7), typeof(QcowFormatException), ["refcount_order"]),
        ["header-length-too-small"] = new(i => i.SetU32(HeaderLength, 50), typeof(QcowFormatException), ["header_length"]),
        ["header-length-beyond-cluster"] = new(i => i.SetU32(HeaderLength, 0x20000), typeof(QcowFormatException), ["header_length"]),
        ["header-length-huge"] = new(i => i.SetU32(HeaderLength, 0xfffffff8), typeof(QcowFormatException), ["header_length"]),
        ["header-length-not-multiple-of-8"] = new(i => i.SetU32(HeaderLength, 113), typeof(QcowFormatException), ["header_length"]),
        ["extension-length-huge"] = new(i => i.SetU32(i.U32(HeaderLength) + 4, 0xfffffff0), typeof(QcowFormatException), ["extension"]),
        ["extension-length-past-cluster"] = new(i => i.SetU32(i.U32(HeaderLength) + 4, (uint)i.ClusterSize), typeof(QcowFormatException), ["extension"]),
        ["snapshots-huge"] = new(i => i.SetU32(NbSnapshots, 0xffffffff), typeof(QcowFormatException), ["nb_snapshots"]),
        ["backing-file-name-outside-cluster"] = new(i => i.SetU64(BackingFileOffset, 0xfffffffffffff000).SetU32(16, 100), typeof(QcowFormatException), ["backing_file"], QemuRefuses: false),
    };

    public static TheoryData<string> Names()
    {
        var d = new TheoryData<string>();
        foreach (var k in Cases.Keys)
        {
            d.Add(k);
        }
        return d;
    }

    [Theory]
    [MemberData(nameof(Names))]
    public void DamagedHeaderIsRefusedWithATypedExceptionNamingTheField(string name)
    {
        var c = Cases[name];
        using var dir = new TempDir();
        var img = CreateBase(dir);
        c.Patch(img);
        var path = img.Save();

        if (c.QemuRefuses)
        {
            var q = QemuTools.Img("info", "-f", "qcow2", path);
            q.ExitCode.Should().NotBe(0, $"qemu-img also refuses {name}: {q.StdOut}");
        }

        foreach (var readOnly in new[] { true, false })
        {
            var e = Guard.Fails<QcowException>(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = readOnly }).Dispose(), c.Fragments);
            e.Should().BeAssignableTo(c.Expected);
            e.Message.Should().Contain(path, "the message names the file");
            if (e is QcowFormatException f && c.Fragments.Length > 0 && !name.StartsWith("truncated", StringComparison.Ordinal))
            {
                f.Field.Should().NotBeNullOrEmpty("the exception names the on-disk field");
                f.Offset.Should().BeGreaterThanOrEqualTo(0, "the exception names the offset");
            }
        }
        // Refusing must not have modified the file.
        File.ReadAllBytes(path).Should().Equal(img.Bytes);
    }

    /// <summary>Opening through a stream or a handle takes the same checks.</summary>
    [Fact]
    public void StreamAndHandleOpensAreCheckedToo()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        img.SetU32(L1Size, 0x7fffffff);
        var path = img.Save();
        Guard.Fails<QcowFormatException>(() =>
        {
            using var fs = new FileStream(path, FileMode.Open, FileAccess.Read);
            QcowImage.Open(fs, new QcowOpenOptions { ReadOnly = true }).Dispose();
        }, "l1_size");
        Guard.Fails<QcowFormatException>(() =>
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read);
            QcowImage.Open(h, new QcowOpenOptions { ReadOnly = true, LeaveOpen = true }).Dispose();
        }, "l1_size");
        Guard.Fails<QcowFormatException>(() =>
        {
            using var ms = new MemoryStream(new byte[] { 0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3 });
            QcowImage.Open(ms, new QcowOpenOptions { ReadOnly = true }).Dispose();
        }, "header");
    }

    /// <summary>
    /// The largest L1 table QEMU accepts (32 MiB), claimed by a small image whose (sparse) file is long enough:
    /// it opens, as in QEMU, without allocating much more than the table itself.
    /// </summary>
    [Fact]
    public void LargestLegalL1TableOpensWithoutAllocatingTwice()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir);
        const uint entries = 4 << 20; // 32 MiB of L1 entries
        var l1 = img.L1Offset;
        var end = l1 + entries * 8L;
        img.SetU32(L1Size, entries);
        var path = img.Save();
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Write))
        {
            f.SetLength(Math.Max(f.Length, end)); // sparse: the extra entries read as zero (unallocated)
        }
        QemuTools.Img("info", "-f", "qcow2", path).ExitCode.Should().Be(0, "QEMU accepts it");
        Guard.Succeeds(() =>
        {
            using var q = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
            var buf = new byte[65536];
            q.Read(0, buf);
            buf.Should().OnlyContain(b => b == 0x11);
        });
    }

    /// <summary>A header in a 2 MiB-cluster image whose extension area is entirely unknown extensions of length 0.</summary>
    [Fact]
    public void ExtensionAreaFullOfEmptyExtensionsOpensWithoutBlowingUp()
    {
        using var dir = new TempDir();
        var img = CreateBase(dir, clusterSize: 65536);
        var exts = Enumerable.Range(0, 2000).Select(i => ((uint)(0x10000 + i), Array.Empty<byte>())).ToArray();
        img.SetExtensions(exts);
        var path = img.Save();
        QemuTools.Img("info", "-f", "qcow2", path).ExitCode.Should().Be(0, "QEMU accepts any number of unknown extensions");
        // We may accept or refuse, but only with a typed exception, quickly and cheaply.
        Guard.SucceedsOrFailsTyped(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }).Dispose());
    }
}
