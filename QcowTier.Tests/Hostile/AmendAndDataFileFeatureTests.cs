using System.Text;
using QcowTier.Tests.Hostile.Support;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;
using static QcowTier.Tests.Hostile.Support.HostileImage;

namespace QcowTier.Tests.Hostile;

/// <summary>
/// Header extensions across compat upgrades and downgrades, autoclear and incompatible feature handling
/// around QEMU's external data file, and amend's refusals and effects — the ground QEMU's iotests 031,
/// 036 and 061 cover, written afresh against our engine and judged by qemu-img.
/// </summary>
public sealed class AmendAndDataFileFeatureTests
{
    private const uint UnknownExtension = 0x0badcafe;
    private const ulong DataFileBit = 1UL << 2;
    private const ulong RawDataBit = 1UL << 1;

    private static byte[] Content(string path, TempDir dir) => QemuTools.ReadRaw(path, dir);

    private static QcowImageInfo Info(string path)
    {
        using var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        return img.GetInfo();
    }

    // ------------------------------------------------------------------ 031: extensions and compat changes

    /// <summary>An unknown extension survives an upgrade to 1.1 and a downgrade back to 0.10; QEMU agrees on the result.</summary>
    [Theory]
    [InlineData(65536)]
    [InlineData(4096)]
    public void Unknown_header_extension_survives_upgrade_and_downgrade(int clusterSize)
    {
        using var dir = new TempDir();
        var h = CreateBase(dir, clusterSize: clusterSize, extraOptions: ",compat=0.10");
        // Version 2: the extensions start right after the 72-byte header.
        var ext = new byte[8 + 24];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(ext, UnknownExtension);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(ext.AsSpan(4), 17);
        Encoding.ASCII.GetBytes("keep me, 17 bytes").CopyTo(ext, 8);
        ext.CopyTo(h.Bytes, 72);
        h.Save();
        var before = Content(h.Path, dir);

        using (var img = QcowImage.Open(h.Path))
        {
            img.Amend(new QcowAmendOptions { Compat = QcowCompat.V3 });
            img.Version.Should().Be(3);
        }
        var up = Load(h.Path);
        up.U32(VersionField).Should().Be(3);
        up.U32(HeaderLength).Should().Be(112);
        Encoding.ASCII.GetString(up.Bytes).Should().Contain("keep me, 17 bytes");
        if (clusterSize >= 8192)
        {
            Encoding.ASCII.GetString(up.Bytes).Should().Contain("lazy refcounts", "QEMU's feature name table is written for version 3 (clusters of 8 KiB and more)");
        }
        QemuTools.AssertClean(h.Path);
        QemuTools.AssertBytesEqual(before, Content(h.Path, dir), "content after the upgrade");

        using (var img = QcowImage.Open(h.Path))
        {
            img.Amend(new QcowAmendOptions { Compat = QcowCompat.V2 });
        }
        var down = Load(h.Path);
        down.U32(VersionField).Should().Be(2);
        Encoding.ASCII.GetString(down.Bytes, 0, clusterSize).Should().Contain("keep me, 17 bytes").And.NotContain("lazy refcounts");
        QemuTools.AssertClean(h.Path);
        QemuTools.AssertBytesEqual(before, Content(h.Path, dir), "content after the downgrade");
    }

    /// <summary>Our upgrade writes the same header cluster as qemu-img amend does.</summary>
    [Theory]
    [InlineData(4096)]
    [InlineData(65536)]
    public void Upgrade_writes_qemu_s_header(int clusterSize)
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=" + clusterSize, ours, "8M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 0x33 100k 300k", ours).EnsureSuccess();
        File.Copy(ours, theirs);
        using (var img = QcowImage.Open(ours))
        {
            img.Amend(new QcowAmendOptions { Compat = QcowCompat.V3 });
        }
        QemuTools.Img("amend", "-o", "compat=1.1", theirs).EnsureSuccess();
        QemuTools.AssertBytesEqual(File.ReadAllBytes(theirs).AsSpan(0, clusterSize), File.ReadAllBytes(ours).AsSpan(0, clusterSize), "header cluster after the upgrade");
    }

    // ------------------------------------------------------------------ 036: autoclear and incompatible bits

    /// <summary>A writable open clears unknown autoclear bits, but keeps the raw-data bit of an image whose data file it keeps raw.</summary>
    [Fact]
    public void Writable_open_keeps_the_raw_data_bit_and_clears_unknown_autoclear_bits()
    {
        using var dir = new TempDir();
        var path = dir.File("raw.qcow2");
        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=raw.data,data_file_raw=on", "raw.qcow2", "4M").EnsureSuccess();
        var h = Load(path);
        h.SetU64(AutoclearFeatures, h.U64(AutoclearFeatures) | (1UL << 5)).Save();
        using (var img = QcowImage.Open(path))
        {
            img.Write(4096, new byte[] { 1, 2, 3 });
        }
        Load(path).U64(AutoclearFeatures).Should().Be(RawDataBit);
        Info(path).DataFileRaw.Should().BeTrue();
        File.ReadAllBytes(dir.File("raw.data")).AsSpan(4096, 3).ToArray().Should().Equal(1, 2, 3);
    }

    /// <summary>The raw-data bit without a data file means nothing we maintain: cleared like any autoclear bit.</summary>
    [Fact]
    public void Raw_data_bit_without_a_data_file_is_cleared()
    {
        using var dir = new TempDir();
        var h = CreateBase(dir);
        h.SetU64(AutoclearFeatures, RawDataBit).Save();
        using (QcowImage.Open(h.Path))
        {
        }
        Load(h.Path).U64(AutoclearFeatures).Should().Be(0);
        QemuTools.AssertClean(h.Path);
    }

    [Fact]
    public void Data_file_bit_without_a_name_is_refused_unless_the_file_is_given()
    {
        using var dir = new TempDir();
        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.data", "d.qcow2", "1M").EnsureSuccess();
        Qemu.RunIn(dir.Path, "qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 64k", "d.qcow2").EnsureSuccess();
        var h = Load(dir.File("d.qcow2"));
        h.SetExtensions().Save();
        Guard.Fails<QcowFormatException>(() => QcowImage.Open(h.Path).Dispose(), "data-file", "required");
        using var img = QcowImage.Open(h.Path, new QcowOpenOptions { ReadOnly = true, ExternalDataFile = dir.File("d.data") });
        var buf = new byte[65536];
        img.Read(0, buf);
        buf.Should().OnlyContain(b => b == 0x5a);
    }

    /// <summary>A hostile image must not make us open files outside its folder.</summary>
    [Theory]
    [InlineData("../escape.data")]
    [InlineData("sub/../../escape.data")]
    [InlineData("/etc/passwd")]
    public void Data_file_names_leaving_the_folder_are_refused_by_default(string name)
    {
        using var dir = new TempDir();
        var inner = Path.Combine(dir.Path, "inner");
        Directory.CreateDirectory(inner);
        File.WriteAllBytes(dir.File("escape.data"), new byte[1 << 20]);
        Qemu.RunIn(inner, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.data", "d.qcow2", "1M").EnsureSuccess();
        var h = Load(Path.Combine(inner, "d.qcow2"));
        h.SetExtensions((0x44415441, Encoding.UTF8.GetBytes(name))).Save();
        var e = Guard.Fails<QcowFormatException>(() => QcowImage.Open(h.Path, new QcowOpenOptions { ReadOnly = true }).Dispose());
        e.Message.Should().Contain(name);
        if (!name.StartsWith('/'))
        {
            using var img = QcowImage.Open(h.Path, new QcowOpenOptions { ReadOnly = true, AllowExternalDataFileAnywhere = true });
            img.ExternalDataFile.Should().Be(Path.GetFullPath(dir.File("escape.data")));
        }
    }

    [Fact]
    public void Data_file_in_a_subfolder_is_followed()
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("data"));
        using (var img = QcowImage.Create(dir.File("s.qcow2"), 1 << 20, new QcowCreateOptions { DataFile = "data/s.raw" }))
        {
            img.Write(0, new byte[] { 9, 9, 9 });
        }
        Encoding.UTF8.GetString(Load(dir.File("s.qcow2")).Bytes).Should().Contain("data/s.raw");
        Qemu.RunIn(dir.Path, "qemu-io", "-f", "qcow2", "-c", "read -q -P 9 0 3", "s.qcow2").EnsureSuccess();
        Qemu.RunIn(dir.Path, "qemu-img", "check", "s.qcow2").EnsureSuccess();
    }

    [Fact]
    public void A_tiered_image_with_a_qemu_data_file_is_refused()
    {
        using var dir = new TempDir();
        var path = dir.File("t.qcow2");
        using (QcowImage.Create(path, 1 << 20, new QcowCreateOptions { Tier = new QcowTierOptions { DataFile = "t.hdd" } }))
        {
        }
        var h = Load(path);
        h.SetU64(IncompatibleFeatures, h.U64(IncompatibleFeatures) | DataFileBit).Save();
        Guard.Fails<QcowUnsupportedFeatureException>(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }).Dispose(), "tiered", "data file");
        FluentActions.Invoking(() => QcowImage.Create(dir.File("u.qcow2"), 1 << 20, new QcowCreateOptions { DataFile = "u.raw", Tier = new QcowTierOptions { DataFile = "u.hdd" } }))
            .Should().Throw<ArgumentException>();
    }

    // ------------------------------------------------------------------ 061: amend

    /// <summary>A downgrade expands zero clusters: plain ones become unallocated, preallocated ones get zeroes; QEMU's result is the same.</summary>
    [Fact]
    public void Downgrade_expands_zero_clusters_as_qemu_does()
    {
        using var dir = new TempDir();
        var ours = dir.File("ours.qcow2");
        var theirs = dir.File("theirs.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", ours, "8M").EnsureSuccess();
        QemuTools.Io("-f", "qcow2", "-c", "write -q -P 1 0 1M", "-c", "write -q -z 2M 1M", "-c", "write -q -z 0 64k", "-c", "write -q -z 512k 128k", ours).EnsureSuccess();
        File.Copy(ours, theirs);
        var before = Content(ours, dir);
        using (var img = QcowImage.Open(ours))
        {
            img.Amend(new QcowAmendOptions { Compat = QcowCompat.V2 });
        }
        QemuTools.Img("amend", "-o", "compat=0.10", theirs).EnsureSuccess();
        QemuTools.AssertClean(ours);
        QemuTools.AssertBytesEqual(before, Content(ours, dir), "content after the downgrade");
        QemuTools.Img("map", "--output=json", ours).StdOut.Should().Be(QemuTools.Img("map", "--output=json", theirs).StdOut);
        QemuTools.AssertBytesEqual(File.ReadAllBytes(theirs).AsSpan(0, 65536), File.ReadAllBytes(ours).AsSpan(0, 65536), "header cluster after the downgrade");
    }

    /// <summary>A dirty lazy-refcount image (a crash) is repaired and made clean before it can be downgraded.</summary>
    [Fact]
    public void Dirty_lazy_image_is_made_clean_then_downgraded()
    {
        using var dir = new TempDir();
        var h = CreateBase(dir, extraOptions: ",lazy_refcounts=on");
        // A crash with lazy refcounts: the dirty bit is set and the refcounts are stale (cluster leaked and one missing).
        h.SetU64(IncompatibleFeatures, 1).Save();
        var before = Content(h.Path, dir);
        using (var img = QcowImage.Open(h.Path))
        {
            img.Amend(new QcowAmendOptions { Compat = QcowCompat.V2 });
        }
        Info(h.Path).Version.Should().Be(2);
        QemuTools.AssertClean(h.Path);
        QemuTools.AssertBytesEqual(before, Content(h.Path, dir), "content");
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    [InlineData(8)]
    [InlineData(32)]
    [InlineData(64)]
    public void Refcount_width_changes_keep_the_image_clean(int bits)
    {
        using var dir = new TempDir();
        var h = CreateBase(dir, clusterSize: 512);
        var before = Content(h.Path, dir);
        using (var img = QcowImage.Open(h.Path))
        {
            img.Amend(new QcowAmendOptions { RefcountBits = bits, LazyRefcounts = bits % 2 == 0 });
            img.RefcountBits.Should().Be(bits);
            img.Write(3L << 20, new byte[70000]); // allocating under the new width
            img.Write(5000, [7, 7, 7]);
        }
        QemuTools.AssertClean(h.Path);
        var info = QemuTools.Img("info", "--output=json", h.Path).StdOut;
        info.Should().Contain($"\"refcount-bits\": {bits}");
        using (var img = QcowImage.Open(h.Path))
        {
            img.Amend(new QcowAmendOptions { RefcountBits = 16, LazyRefcounts = false });
        }
        QemuTools.AssertClean(h.Path);
        before.AsSpan(5000, 3).Fill(7);
        QemuTools.AssertBytesEqual(before, Content(h.Path, dir), "content after two width changes");
    }

    [Fact]
    public void Amend_refusals_leave_the_image_untouched()
    {
        using var dir = new TempDir();
        var h = CreateBase(dir, extraOptions: ",refcount_bits=1");
        var bytes = File.ReadAllBytes(h.Path);
        using (var img = QcowImage.Open(h.Path))
        {
            FluentActions.Invoking(() => img.Amend(new QcowAmendOptions { Compat = QcowCompat.V2 })).Should().Throw<NotSupportedException>().WithMessage("compat=0.10 requires refcount_bits=16");
            FluentActions.Invoking(() => img.Amend(new QcowAmendOptions { Compat = QcowCompat.V2, LazyRefcounts = true })).Should().Throw<ArgumentException>().WithMessage("Lazy refcounts only supported*");
            FluentActions.Invoking(() => img.Amend(new QcowAmendOptions { RefcountBits = 3 })).Should().Throw<ArgumentException>().WithMessage("Refcount width must be a power of two*");
        }
        File.ReadAllBytes(h.Path).Should().Equal(bytes);

        Qemu.RunIn(dir.Path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=x.data", "x.qcow2", "1M").EnsureSuccess();
        using var withData = QcowImage.Open(dir.File("x.qcow2"));
        FluentActions.Invoking(() => withData.Amend(new QcowAmendOptions { Compat = QcowCompat.V2 })).Should().Throw<NotSupportedException>().WithMessage("Cannot downgrade an image with a data file");
    }
}
